"""Imported by the local executor's forkserver, as its last preload (``local.PRELOAD``).

When its driver is gone the server ends at once, without tearing down the torch and MLflow it
imported: that takes about 2 s, and the server holds the driver's stdout and stderr open until
it ends, so a caller reading them (a pipe, ``$(workbench run ...)``, CI) would wait that long
after the driver exited. Its workers end through ``os._exit`` and never run atexit handlers.
Imported anywhere else than from the server's preloading, it does nothing.
"""

import atexit
import inspect
import os


def _preloading_forkserver() -> bool:
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            return frame.f_code.co_name == "main"
        frame = frame.f_back
    return False


if _preloading_forkserver():
    atexit.register(os._exit, 0)
