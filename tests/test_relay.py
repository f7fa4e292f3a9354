"""A local worker's store calls made by its driver (workbench.sweep.relay), against a real SQLite
store: the worker sees what the store said, values and errors alike; a driver gone mid-call is an
interruption, and the worker's later calls reach the store directly."""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from runs import Store

from workbench.sweep.executors import local
from workbench.sweep.jobs import DriverLost, is_environment_failure
from workbench.sweep.relay import Relay, RelayedClient, StoreCall, StoreReply
from workbench.tracking import ensure_experiment


class Driver:
    """The driver's end of a worker's pipe, answering in a thread as the local executor does."""

    def __init__(self, conn: Any, answers: int | None = None) -> None:
        self.conn = conn
        self.answered: list[str] = []
        self.thread = threading.Thread(target=self.serve, args=(answers,), daemon=True)
        self.thread.start()

    def serve(self, answers: int | None) -> None:
        while answers is None or len(self.answered) < answers:
            try:
                call = self.conn.recv()
            except (EOFError, OSError):
                return
            assert isinstance(call, StoreCall)
            self.answered.append(call.method)  # before the answer: the worker goes on after it
            local._answer(self.conn, call)
        self.conn.close()  # then gone, as a killed driver's end of the pipe


@pytest.fixture
def pipe() -> Iterator[tuple[Any, Any]]:
    ours, theirs = mp.Pipe()
    yield ours, theirs
    ours.close()
    theirs.close()


def new_run(store: Store) -> str:
    experiment_id = ensure_experiment(store.uri, "t")
    return str(store.client.create_run(experiment_id, run_name="r").info.run_id)


def test_a_relayed_call_returns_what_the_store_returns(store: Store, pipe: Any) -> None:
    run_id = new_run(store)
    worker_end, driver_end = pipe
    driver = Driver(driver_end)
    relayed = RelayedClient(Relay(worker_end), store.uri)
    relayed.set_tag(run_id, "k", "v")
    relayed.log_param(run_id, "p", "1")
    run = relayed.get_run(run_id)
    assert run.data.tags["k"] == "v" and run.data.params == {"p": "1"}
    assert run.info.run_id == store.client.get_run(run_id).info.run_id
    assert driver.answered == ["set_tag", "log_param", "get_run"]
    with pytest.raises(AttributeError):  # private attributes are not calls to relay
        relayed._tracking_client  # noqa: B018


def test_a_store_error_reaches_the_worker_as_itself(store: Store, pipe: Any) -> None:
    new_run(store)
    worker_end, driver_end = pipe
    Driver(driver_end)
    relayed = RelayedClient(Relay(worker_end), store.uri)
    with pytest.raises(MlflowException) as raised:
        relayed.get_run("0" * 32)
    assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert is_environment_failure(raised.value)  # the store's trouble, not the run's


def test_a_driver_gone_mid_call_interrupts_and_later_calls_go_to_the_store(
    store: Store, pipe: Any
) -> None:
    run_id = new_run(store)
    worker_end, driver_end = pipe
    Driver(driver_end, answers=1)  # answers one call, then is gone
    relay = Relay(worker_end)
    relayed = RelayedClient(relay, store.uri)
    relayed.set_tag(run_id, "first", "1")
    with pytest.raises(DriverLost):
        relayed.set_tag(run_id, "second", "2")
    assert relay.lost
    relayed.set_tag(run_id, "third", "3")  # directly: the run can still be marked KILLED
    relayed.set_terminated(run_id, status="KILLED")
    run = store.client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert {"first", "third"} <= set(run.data.tags) and "second" not in run.data.tags
    with pytest.raises(DriverLost):  # an event to a driver that is gone
        relay.send("an event")


def test_an_answer_that_cannot_be_sent_is_a_store_error(
    store: Store, pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = new_run(store)
    worker_end, driver_end = pipe
    unsendable = StoreReply(value=lambda: None)  # a lambda does not pickle
    monkeypatch.setattr(local, "answer", lambda call: unsendable)
    Driver(driver_end)
    with pytest.raises(MlflowException, match="not sent") as raised:
        RelayedClient(Relay(worker_end), store.uri).get_run(run_id)
    assert is_environment_failure(raised.value)


def test_an_asynchronous_store_call_is_stored_before_the_worker_goes_on(
    store: Store, pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MLflow's async logging on, the driver's log_batch returns a handle; the worker's
    call returns only once the points are stored (it checkpoints next)."""
    from mlflow.entities import Metric

    run_id = new_run(store)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true")
    worker_end, driver_end = pipe
    Driver(driver_end)
    relayed = RelayedClient(Relay(worker_end), store.uri)
    points = [Metric("loss", 1.0 / step, 1000 + step, step) for step in range(1, 200)]
    assert relayed.log_batch(run_id, metrics=points) is None
    monkeypatch.delenv("MLFLOW_ENABLE_ASYNC_LOGGING")
    assert len(store.client.get_metric_history(run_id, "loss")) == 199


def test_an_answer_that_cannot_be_read_is_a_store_error(store: Store, pipe: Any) -> None:
    run_id = new_run(store)
    worker_end, driver_end = pipe

    def garbled() -> None:
        driver_end.recv()
        driver_end.send_bytes(b"not a pickle")

    threading.Thread(target=garbled, daemon=True).start()
    relay = Relay(worker_end)
    with pytest.raises(MlflowException, match="get_run") as raised:
        RelayedClient(relay, store.uri).get_run(run_id)
    assert is_environment_failure(raised.value) and not relay.lost


def test_a_run_interrupted_as_its_driver_goes_is_still_ended_killed(
    store: Store, pipe: Any
) -> None:
    """The job's interrupt handler marks the run KILLED through the relay; the driver goes in
    the middle of that: the worker finishes it against the store."""
    from workbench.sweep.jobs import Job, end_killed

    run_id = new_run(store)
    worker_end, driver_end = pipe
    Driver(driver_end, answers=0)  # gone at the first call
    job = Job("r", "k", {}, run_id, store.uri, str(store.checkpoints / "r"), ".")
    result = end_killed(
        job, "the driver process is gone", RelayedClient(Relay(worker_end), store.uri)
    )
    assert result.status == "killed"
    run = store.client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["workbench.reason"] == "the driver process is gone"
