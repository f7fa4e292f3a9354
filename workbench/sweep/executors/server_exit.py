"""Imported by the local executor's forkserver only, as its last preload (``local.PRELOAD``).

When its driver is gone the server ends at once, without tearing down the torch and MLflow it
imported: that takes about 2 s, and the server holds the driver's stdout and stderr open until
it ends, so a caller reading them (a pipe, ``$(workbench run ...)``, CI) would wait that long
after the driver exited. Its workers end through ``os._exit`` and never run atexit handlers.
"""

import atexit
import os

atexit.register(os._exit, 0)
