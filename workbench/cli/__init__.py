"""The command line: the only layer that uses typer and rich.

``app`` holds the commands, ``plan_view`` the plan table, ``progress`` the live sweep display.
"""

from workbench.cli.app import app, console, main

__all__ = ["app", "console", "main"]
