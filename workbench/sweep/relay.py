"""A local worker's store calls, made by its driver.

A local worker and its driver share a machine, and the driver has the tracking store open
already. Opening it again in each worker costs about a second (importing MLflow's SQLAlchemy
store) before the worker's first step, more than a short run trains. So a local worker's
``MlflowClient`` (:func:`workbench.store.client`) is a :class:`RelayedClient`: each call is sent
over the worker's pipe, made by the driver with its own client, and its value or its exception
sent back. What the worker sees is what the store said: the same values, the same exception
types (an MLflow error keeps its error code), in the same order, one call at a time.

A Ray task, on another machine, opens the store itself: nothing here is used there; nor is it
for MLflow's system metrics monitor (``--system-metrics``), which opens the store in the worker.

When the driver is gone (killed), the call in flight raises :class:`DriverLost` (an
interruption: the run stays resumable), and the worker's later calls (marking its run KILLED)
go to the store directly, as they would have without the relay.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from workbench.sweep.jobs import DriverLost, signals_deferred


@dataclass(frozen=True)
class StoreCall:
    """A worker's call of one ``MlflowClient`` method on the store at ``uri``."""

    uri: str
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class StoreReply:
    value: Any = None
    error: BaseException | None = None
    error_code: str | None = None  # an MlflowException's (pickling loses it)


def answer(call: StoreCall) -> StoreReply:
    """Make ``call`` with this process's client (the driver's) and say what came of it. A call
    MLflow made asynchronously (``MLFLOW_ENABLE_ASYNC_LOGGING``) is waited for: the worker's
    next step (a checkpoint) relies on what it logged being stored."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.async_logging.run_operations import RunOperations

    from workbench.store import client

    try:
        value = getattr(client(call.uri), call.method)(*call.args, **call.kwargs)
        if isinstance(value, RunOperations):
            operations: Any = value  # untyped in MLflow
            operations.wait()
            value = None
        return StoreReply(value=value)
    except Exception as exc:  # the worker's to handle, as if it had called the store itself
        code = exc.error_code if isinstance(exc, MlflowException) else None
        return StoreReply(error=exc, error_code=code)


@functools.cache
def is_quick(uri: str) -> bool:
    """A store whose calls take milliseconds (a local SQLite file), which the driver makes with
    Ctrl-C held back: an interrupt in the middle of one could leave the driver's connection to
    it half-used, and the calls that then mark runs KILLED go through it. A server's calls may
    take minutes of retries."""
    from workbench.store import sqlite_path

    return sqlite_path(uri) is not None


def unpicklable(reply: StoreReply, problem: BaseException) -> StoreReply:
    """What is sent instead of a reply that cannot be pickled: a store error saying so."""
    what = f"{type(reply.error).__name__}: {reply.error}" if reply.error else "its value"
    return StoreReply(error=_store_error(f"store call's answer not sent ({problem}): {what}"))


def _store_error(message: str) -> BaseException:
    """An error of the store (``workbench.sweep.jobs.is_environment_failure``): KILLED, never
    a verdict on the run."""
    from mlflow.exceptions import MlflowException

    return MlflowException(message)


@dataclass
class Relay:
    """The worker's end: its pipe to the driver, shared with its progress events."""

    conn: Connection
    lock: threading.Lock = field(default_factory=threading.Lock)
    lost: bool = False  # the driver is gone: calls go to the store directly

    def send(self, message: Any) -> None:
        """Send an event; a driver that is gone raises DriverLost."""
        with self.lock:
            try:
                self.conn.send(message)
            except OSError:
                raise self._gone() from None

    def _gone(self) -> DriverLost:
        """The driver is gone: this call is interrupted, and later ones go to the store."""
        self.lost = True
        return DriverLost("the driver process is gone")

    def call(self, call: StoreCall) -> Any:
        # A signal waits for the answer: one taken half-read would garble the pipe for the
        # calls after it (the interruption then comes as soon as the call is done).
        with self.lock, signals_deferred():
            try:
                self.conn.send(call)
                reply = self.conn.recv()
            except (EOFError, OSError):
                reply = None
            except Exception as exc:  # a call or an answer that did not pickle: the store's
                reply = StoreReply(error=_store_error(f"store call {call.method}: {exc!r}"))
        if not isinstance(reply, StoreReply):  # no answer, or the driver stopping the worker
            raise self._gone()
        if reply.error is not None:
            if reply.error_code is not None:
                reply.error.error_code = reply.error_code  # type: ignore[attr-defined]
            raise reply.error
        return reply.value


class RelayedClient:
    """An ``MlflowClient`` for the store at ``uri`` whose calls its driver makes."""

    def __init__(self, relay: Relay, uri: str) -> None:
        self._relay = relay
        self._uri = uri
        self._direct: Any = None

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._relay.lost:
                return getattr(self._store(), method)(*args, **kwargs)
            return self._relay.call(StoreCall(self._uri, method, args, kwargs))

        return call

    def _store(self) -> Any:
        from workbench.store import direct_client

        if self._direct is None:
            self._direct = direct_client(self._uri)
        return self._direct
