"""Executors run jobs: ``local`` in worker processes on this machine, ``ray`` on a Ray cluster."""
