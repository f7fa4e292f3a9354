"""Packs in a sweep: which runs the driver packs, and `workbench run --pack` end to end against a
real SQLite store (real worker processes, real signals): each member's MLflow run as a run
trained alone has it, skip and --force per member, a diverged member, a killed pack resumed."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from runs import Store, invoke, start, wait_for
from specs import write_spec
from test_trainer import Recorder, StopsAtCheckpoint

from workbench.corpus import Corpus
from workbench.grid import expand
from workbench.settings import load_settings
from workbench.spec import RunConfig, pack_key
from workbench.store import ensure_experiment
from workbench.sweep.driver import Action, Decision
from workbench.sweep.jobs import DriverLost, Job, MlflowCallback, execute_job
from workbench.sweep.packs import Pack, PackOf, execute_pack, group
from workbench.tracking import TAG, MetricBuffer, RunRecord, RunState
from workbench.train.packed import build_packed_trainer, checkpoint_step
from workbench.train.trainer import Trainer

MH = {"multi_head": {"model": {"kind": "multi_head"}}}
GRID = {"train.learning_rate": [1.0e-3, 3.0e-3]}
# Tags that say which process trained a run and when: they differ between any two sweeps.
PER_PROCESS = {"pid", "pid_start", "driver_pid", "driver_pid_start", "sweep", "heartbeat", "host",
               "pack", "pack_size", "threads", "packed", "pack_members"}  # fmt: skip


def decisions(tmp_path: Path, action: Action = Action.NEW, **top: Any) -> list[Decision]:
    plan = expand(write_spec(tmp_path, **top))
    return [Decision(run, action, RunState.TO_DO) for run in plan.runs]


def names(work: list[Any]) -> list[Any]:
    return [
        [d.run.name for d in item.decisions] if isinstance(item, PackOf) else item.run.name
        for item in work
    ]


# --- which runs pack together (no training) ---------------------------------------------------


def test_runs_that_differ_in_seed_and_rate_pack_and_other_shapes_do_not(tmp_path: Path) -> None:
    train = {"max_iters": 40, "eval_interval": 20, "device": "auto"}
    shapes = {**GRID, "train.block_size": [8, 16]}
    todo = decisions(tmp_path, seeds=[1, 2], grid=shapes, variants=MH, train=train)
    work = group(todo, "on", gpus=0)
    assert [len(item) for item in work] == [4, 4]  # one pack per block size
    for pack in work:
        assert isinstance(pack, PackOf)
        assert len({d.run.config.train.block_size for d in pack.decisions}) == 1
        assert len({(d.run.seed, d.run.config.train.learning_rate) for d in pack.decisions}) == 4
    assert group(todo, "off", gpus=0) == todo
    assert group(todo, "auto", gpus=0) == todo  # a CPU: alone, as fast as packed or faster
    assert [len(item) for item in group(todo, "auto", gpus=1)] == [4, 4]  # a GPU: packed
    on_cpu = decisions(tmp_path / "cpu", seeds=[1, 2], variants=MH)  # train.device: cpu
    assert group(on_cpu, "auto", gpus=1) == on_cpu
    chunked = group(todo, "on", gpus=0, size=3)
    assert [len(item) if isinstance(item, PackOf) else 1 for item in chunked] == [3, 1, 3, 1]
    assert isinstance(chunked[1], Decision)  # a pack of one is a run alone
    assert [len(item) for item in group(todo, "on", gpus=0, workers=4)] == [2, 2, 2, 2]
    assert [len(item) for item in group(todo, "on", gpus=0, workers=2)] == [4, 4]  # 2 groups
    flat = [n for item in names(chunked) for n in (item if isinstance(item, list) else [item])]
    assert sorted(flat) == sorted(d.run.name for d in todo)  # every run once


def test_runs_that_cannot_pack_train_alone(tmp_path: Path) -> None:
    dropout = decisions(tmp_path / "a", seeds=[1, 2], variants=MH, model={"dropout": 0.1})
    assert pack_key(dropout[0].run.config) is None
    assert group(dropout, "on", gpus=0) == dropout
    kinds = decisions(tmp_path / "b", seeds=[1, 2])  # bigram and multi_head: two shapes
    assert sorted(len(item) for item in group(kinds, "on", gpus=0)) == [2, 2]
    new = decisions(tmp_path / "c", seeds=[1, 2], variants=MH)
    resumed = [Decision(d.run, Action.RESUME, RunState.KILLED) for d in new]
    work = group([new[0], resumed[1]], "on", gpus=0)
    assert work == [new[0], resumed[1]]  # a new run never packs with a resumed one


def resumed(decision: Decision, members: tuple[str, ...] | None) -> Decision:
    """``decision`` as a KILLED run in the store, which first started in a pack of ``members``
    (() alone; None: recorded before workbench stored how a run started)."""
    tags = {} if members is None else {TAG + "packed": "true" if members else "false"}
    if members:
        tags[TAG + "pack_members"] = "+".join(members)
    record = RunRecord("id-" + decision.run.key, "KILLED", tags, {}, 0)
    return Decision(decision.run, Action.RESUME, RunState.KILLED, record)


def test_a_resume_trains_as_its_run_first_started(tmp_path: Path) -> None:
    """Packed or alone is fixed when a run is created: float sums differ between the two (and
    between packs of other members), so a resume keeps its run's way whatever --pack says."""
    new = decisions(tmp_path, seeds=[1, 2, 3], grid=GRID, variants=MH)
    keys = [d.run.key for d in new]
    pack = (keys[4], keys[0], keys[2])  # a recorded order, not the plan's
    todo = [resumed(new[k], pack) for k in (0, 2, 4)] + [resumed(new[1], ()), resumed(new[3], ())]
    for setting in ("off", "auto", "on"):
        work = group(todo, setting, gpus=0, size=2, workers=4)
        assert names(work) == [
            [new[k].run.name for k in (4, 0, 2)],  # whole (no size cap, no split), its order
            new[1].run.name,  # started alone: never packed
            new[3].run.name,
        ], setting
    whole = group(todo, "on", gpus=0)[0]
    assert isinstance(whole, PackOf) and (whole.rows, whole.width) == ((0, 1, 2), 3)
    last = group([todo[1]], "off", gpus=0)  # the only member left to train: a pack of one,
    assert names(last) == [[new[2].run.name]]
    assert isinstance(last[0], PackOf)  # in its row of a pack as wide as it started
    assert (last[0].rows, last[0].width) == ((2,), 3)
    # A resume recorded before workbench stored how it started packs as before, with resumes.
    legacy = [resumed(d, None) for d in new[:2]]
    assert names(group(legacy, "on", gpus=0)) == [[d.run.name for d in new[:2]]]
    assert group(legacy, "off", gpus=0) == legacy
    # A tag that does not hold the run's own key is not its pack.
    forged = resumed(new[5], (keys[0], keys[1]))
    assert group([forged], "off", gpus=0) == [forged]


# --- end to end (slow) ------------------------------------------------------------------------


def member_view(store: Store, run: Any) -> dict[str, Any]:
    """What a user compares between two runs of one config: everything but who trained it."""
    tags = {
        k: v
        for k, v in run.data.tags.items()
        if not (k.startswith(TAG) and k.removeprefix(TAG) in PER_PROCESS)
        and not k.startswith("mlflow.source")
        and k != "mlflow.parentRunId"  # each store's own parent run
    }
    assert run.data.tags["mlflow.parentRunId"]
    artifacts = sorted(a.path for a in store.client.list_artifacts(run.info.run_id))
    curves = {key: [s for s, _ in store.history(run.info.run_id, key)] for key in run.data.metrics}
    return {"tags": tags, "params": run.data.params, "artifacts": artifacts, "steps": curves}


@pytest.mark.slow
def test_a_packed_sweep_records_each_run_as_if_trained_alone(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, seeds=[1, 2], grid=GRID, variants=MH)
    packed, alone = Store(tmp_path / "packed"), Store(tmp_path / "alone")
    assert invoke("run", str(spec), "--pack", "--jobs", "1", *packed.args()).exit_code == 0
    assert invoke("run", str(spec), "--no-pack", "--jobs", "1", *alone.args()).exit_code == 0
    got, want = packed.by_name(), alone.by_name()
    assert sorted(got) == sorted(want) and len(got) == 4
    assert len({r.data.tags[TAG + "pack"] for r in got.values()}) == 1  # one pack of four
    assert all(TAG + "pack" not in r.data.tags for r in want.values())
    for name, run in got.items():
        assert run.info.status == "FINISHED"
        assert member_view(packed, run) == member_view(alone, want[name])
        for key in ("train_loss", "val_loss"):
            ours = packed.history(run.info.run_id, key)
            theirs = alone.history(want[name].info.run_id, key)
            assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], abs=2e-4)
        assert len(run.outputs.model_outputs) == 1


@pytest.mark.slow
def test_skip_and_force_work_per_member(store: Store, tmp_path: Path) -> None:
    first = write_spec(tmp_path / "a", seeds=[1, 2], variants=MH)
    assert invoke("run", str(first), "--pack", "--jobs", "1", *store.args()).exit_code == 0
    before = {name: run.info.run_id for name, run in store.by_name().items()}
    more = write_spec(tmp_path / "b", seeds=[1, 2, 3, 4], variants=MH)
    result = invoke("run", str(more), "--pack", "--jobs", "1", *store.args())
    assert result.exit_code == 0, result.output
    runs = store.by_name()
    assert {name: runs[name].info.run_id for name in before} == before  # skipped, not redone
    new = [runs[name] for name in runs if name not in before]
    assert len(new) == 2 and len(store.runs()) == 4
    assert new[0].data.tags[TAG + "pack"] == new[1].data.tags[TAG + "pack"]  # packed together
    forced = invoke(
        "run", str(more), "--pack", "-j", "1", "--force", "--only", "*s=2", *store.args()
    )
    assert forced.exit_code == 0, forced.output
    assert [r.info.run_name for r in store.runs()].count("multi_head s=2") == 2
    assert len(store.runs()) == 5


@pytest.mark.slow
def test_a_diverging_member_is_masked_and_the_others_finish(store: Store, tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path, grid={"train.learning_rate": [1.0e-3, 1.0e4]}, variants=MH, seeds=[1]
    )
    alone = Store(tmp_path / "alone")
    packed = invoke("run", str(spec), "--pack", "-j", "1", *store.args())
    assert packed.exit_code == 1  # one diverged
    assert invoke("run", str(spec), "--no-pack", *alone.args()).exit_code == 1
    runs, reference = store.by_name(), alone.by_name()
    assert len({r.data.tags[TAG + "pack"] for r in runs.values()}) == 1  # trained as one pack
    for name, run in runs.items():
        want = reference[name]
        assert run.info.status == want.info.status
        assert run.data.tags.get(TAG + "diverged") == want.data.tags.get(TAG + "diverged")
        ours = [v for _, v in store.history(run.info.run_id, "val_loss")]
        theirs = [v for _, v in alone.history(want.info.run_id, "val_loss")]
        assert ours == pytest.approx(theirs, abs=2e-4, nan_ok=True)
    assert sorted(r.info.status for r in runs.values()) == ["FAILED", "FINISHED"]


LONG = {"max_iters": 1500, "eval_interval": 50, "eval_iters": 2, "device": "cpu"}


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("--pack", "--no-pack"), ("--no-pack", "--pack")])
def test_a_killed_pack_resumes_every_member_exactly(
    store: Store, tmp_path: Path, first: str, then: str
) -> None:
    """Killed mid-run, packed (or alone), and resumed with the other setting: each run resumes
    as it first started, to 1e-6 of its uninterrupted self (packed and alone differ by more
    than that at high rates)."""
    fast = {**LONG, "learning_rate": 1e-2}  # where rounding is amplified most
    spec = write_spec(tmp_path, train=fast, variants=MH, seeds=[1, 2])
    proc = start(spec, store, first, "--jobs", "1")
    started = 2 if first == "--pack" else 1  # runs that train before the kill
    wait_for(lambda: len(list(store.checkpoints.rglob("checkpoint.pt"))) == started, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert "RUNNING" in {r.info.status for r in store.runs()}  # stale

    resumed = invoke("run", str(spec), then, "-j", "1", *store.args())
    assert resumed.exit_code == 0, resumed.output
    reference = Store(tmp_path / "reference")
    assert invoke("run", str(spec), first, "-j", "1", *reference.args()).exit_code == 0
    want = reference.by_name()
    for name, run in store.by_name().items():
        assert run.info.status == "FINISHED"
        history = store.history(run.info.run_id, "val_loss")
        steps = [s for s, _ in history]
        assert steps == sorted(set(steps)), "a step was logged twice"
        expected = reference.history(want[name].info.run_id, "val_loss")
        assert steps == [s for s, _ in expected]
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], abs=1e-6)
        assert len(run.outputs.model_outputs) == 1
        assert run.data.tags[TAG + "packed"] == str(first == "--pack").lower()
        attempts = run.data.tags.get(TAG + "attempt", "1")
        assert (attempts, run.data.tags.get(TAG + "pack_size")) in {
            ("2", "2" if first == "--pack" else None),  # resumed as it started
            ("1", None),  # alone: not started before the kill, trained by the resume
        }


# --- packed training that raises (in process) -------------------------------------------------


def pack_of(store: Store, seeds: list[int], checkpoint_every_s: float = 0.0) -> Pack:
    """A pack of multi_head runs (one per seed), their MLflow runs created as the driver does."""
    experiment_id = ensure_experiment(store.uri, "t")
    jobs = []
    for seed in seeds:
        config = RunConfig.model_validate(
            {
                "data": {"dataset": "tinyshakespeare"},
                "train": {
                    "max_iters": 20,
                    "eval_interval": 10,
                    "eval_iters": 2,
                    "device": "cpu",
                },
                "model": {"kind": "multi_head", "n_embd": 16, "n_head": 2},
                "seed": seed,
            }
        )
        run_id = store.client.create_run(experiment_id, run_name=f"s={seed}").info.run_id
        jobs.append(
            Job(
                name=f"s={seed}",
                key=f"k{seed}",
                config=config.model_dump(mode="json"),
                run_id=run_id,
                tracking_uri=store.uri,
                checkpoint_dir=str(store.checkpoints / f"k{seed}"),
                data_dir=str(load_settings().data_dir),
                checkpoint_every_s=checkpoint_every_s,
            )
        )
    return Pack(tuple(jobs))


@pytest.mark.slow
def test_a_pack_that_raises_trains_each_member_alone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in packed training is no verdict on any member: each trains alone and
    ends as it would have alone; one whose own training raises is the only one FAILED."""
    from workbench.train import packed

    def broken(self: Any) -> None:
        raise RuntimeError("packed step broke")

    monkeypatch.setattr(packed.PackedTrainer, "fit", broken)
    results = execute_pack(pack_of(store, [1, 2]))
    assert [r.status for r in results] == [RunState.FINISHED, RunState.FINISHED]
    for result in results:
        run = store.client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert "packed step broke" in run.data.tags[TAG + "pack_error"]
        assert [s for s, _ in store.history(result.run_id, "val_loss")] == [0, 10, 20]
        assert len(run.outputs.model_outputs) == 1

    real_fit = Trainer.fit

    def second_member_breaks(self: Trainer) -> Any:
        if self.seed == 4:
            raise ValueError("member 4 broke")
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", second_member_breaks)
    results = execute_pack(pack_of(store, [3, 4]))
    assert [r.status for r in results] == [RunState.FINISHED, RunState.FAILED]
    assert "member 4 broke" in (results[1].reason or "")


def test_a_resume_keeps_the_device_it_started_on(store: Store) -> None:
    """``train.device: auto`` chooses per machine: a resume takes the device its run started
    on (``workbench.device``), and on a machine without it the run stays KILLED, resumable,
    saying why, instead of going on with other float sums."""
    import torch

    from workbench.sweep.jobs import job_config

    lacking = "cuda" if not torch.cuda.is_available() else "mps"
    if lacking == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has every device a run can start on")
    (job,) = pack_of(store, [1]).jobs
    assert job_config(replace(job, device="cpu")).train.device == "cpu"  # the spec says cpu
    auto = {**job.config, "train": {**job.config["train"], "device": "auto"}}
    assert job_config(replace(job, config=auto, device="cpu")).train.device == "cpu"
    assert job_config(replace(job, config=auto)).train.device == "auto"  # a new run: auto
    result = execute_job(replace(job, config=auto, device=lacking, resumed=True))
    assert result.status is RunState.KILLED
    run = store.client.get_run(job.run_id)
    assert run.info.status == "KILLED"
    assert f"no {lacking} device" in run.data.tags[TAG + "reason"]
    assert "--force" in run.data.tags[TAG + "reason"]


def test_a_pack_stopped_between_two_members_checkpoints_resumes_as_one(store: Store) -> None:
    """Killed after one member's checkpoint and before the next one's: the member ahead goes
    back to the others' step (here its first checkpoint: it starts over), and the pack resumes
    as one, every point stored once, with the numbers of the pack uninterrupted."""
    pack = pack_of(store, [1, 2, 3])
    configs = [RunConfig.model_validate(job.config) for job in pack.jobs]
    corpus = Corpus.from_file(load_settings().data_dir / "tinyshakespeare.txt", 0.1)
    dirs = [Path(job.checkpoint_dir) for job in pack.jobs]
    callbacks = [Recorder(), StopsAtCheckpoint(10), Recorder()]
    stopped = build_packed_trainer(configs, corpus, list(callbacks), list(dirs))
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    assert [checkpoint_step(d) for d in dirs] == [10, 0, 0]
    want = build_packed_trainer(configs, corpus, [None] * 3, [None] * 3).fit()

    results = execute_pack(Pack(tuple(replace(job, resumed=True) for job in pack.jobs)))
    assert [r.status for r in results] == [RunState.FINISHED] * 3
    for result, expected in zip(results, want, strict=True):
        assert store.client.get_run(result.run_id).data.tags[TAG + "pack_size"] == "3"
        history = store.history(result.run_id, "val_loss")
        assert [s for s, _ in history] == [0, 10, 20]
        assert history[-1][1] == pytest.approx(expected.final_val_loss, abs=1e-6)


def test_a_pack_that_raises_mid_run_stores_each_point_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Points the pack reported but did not store (no checkpoint since) are computed again by
    the run alone: stored once, with the run alone's values."""
    from workbench.train import packed

    real_step = packed.PackedTrainer.step

    def breaks_at_15(self: Any) -> Any:
        if self.members[0].loop.step == 15:
            raise RuntimeError("packed step broke")
        return real_step(self)

    monkeypatch.setattr(packed.PackedTrainer, "step", breaks_at_15)
    results = execute_pack(pack_of(store, [1, 2], checkpoint_every_s=1e9))
    assert [r.status for r in results] == [RunState.FINISHED, RunState.FINISHED]
    for result in results:
        assert [s for s, _ in store.history(result.run_id, "val_loss")] == [0, 10, 20]


def test_an_interrupt_while_members_train_alone_stops_the_rest(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workbench.train import packed

    def broken(self: Any) -> None:
        raise RuntimeError("packed step broke")

    real_fit = Trainer.fit

    def first_interrupted(self: Trainer) -> Any:
        if self.seed == 1:
            raise KeyboardInterrupt
        return real_fit(self)

    monkeypatch.setattr(packed.PackedTrainer, "fit", broken)
    monkeypatch.setattr(Trainer, "fit", first_interrupted)
    results = execute_pack(pack_of(store, [1, 2]))
    assert [r.status for r in results] == [RunState.KILLED, RunState.KILLED]
    assert [store.client.get_run(r.run_id).info.status for r in results] == ["KILLED"] * 2
    assert store.history(results[1].run_id, "val_loss") == []  # never trained alone


def test_a_retried_pack_keeps_the_verdicts_of_members_that_ended(store: Store) -> None:
    """A pack's worker died after some members ended: a retry (Ray's, or the pack run again)
    neither reopens nor retrains them."""
    from workbench.sweep.executors.ray import _retry

    pack = pack_of(store, [1, 2, 3])
    first = execute_pack(Pack(pack.jobs[:1]))[0]  # member 1 ended before the worker died
    assert first.status is RunState.FINISHED
    before = store.history(first.run_id, "val_loss")
    finished: list[Any] = []
    retry = _retry(pack, lambda job, result: finished.append((job.key, result.status)))
    assert finished == [("k1", RunState.FINISHED)]
    assert isinstance(retry, Pack) and [j.key for j in retry.jobs] == ["k2", "k3"]
    assert all(j.resumed and j.attempt == 2 for j in retry.jobs)
    assert retry.layout() == ((1, 2), 3)  # in their rows, as wide as the pack started

    again = execute_pack(Pack(tuple(replace(j, resumed=True) for j in pack.jobs)))
    assert [r.status for r in again] == [RunState.FINISHED] * 3
    assert store.history(first.run_id, "val_loss") == before  # not trained again
    for result in again[1:]:  # trained in a pack of 3, the first member's row masked
        assert store.client.get_run(result.run_id).data.tags[TAG + "pack_size"] == "3"


def test_open_members_of_a_pack_keep_their_heartbeat(store: Store) -> None:
    """A member that diverged or waits its turn reports nothing: the reporting member's
    callback sends its heartbeat, so no one takes its run for a stale one."""
    pack = pack_of(store, [1, 2])
    reporting, waiting = (MetricBuffer(store.uri, job.run_id) for job in pack.jobs)
    waiting.last_heartbeat = 0.0  # long due
    callback = MlflowCallback(reporting, "k1", None, [waiting])
    callback.on_metrics({"train_loss_smooth": 1.0}, 10)
    beat = store.client.get_run(pack.jobs[1].run_id).data.tags[TAG + "heartbeat"]
    assert abs(float(beat) - time.time()) < 60


def test_a_driver_that_is_gone_stops_runs_and_packs_resumable(store: Store) -> None:
    """A worker whose driver is gone (its progress event cannot be sent) stops each run KILLED,
    resumable, with that reason: an interruption of its own kind, neither a Ctrl-C nor a
    failure."""
    assert not issubclass(DriverLost, (KeyboardInterrupt, Exception))

    def driver_gone(progress: Any) -> None:
        raise DriverLost("the driver process is gone")

    alone = pack_of(store, [7]).jobs[0]
    results = [execute_job(alone, driver_gone), *execute_pack(pack_of(store, [5, 6]), driver_gone)]
    for result in results:
        assert result.status == RunState.KILLED and result.reason == "the driver process is gone"
        run = store.client.get_run(result.run_id)
        assert run.info.status == "KILLED", run.data.tags
        assert run.data.tags[TAG + "reason"] == "the driver process is gone"


def test_a_full_disk_under_the_store_is_said_in_those_words() -> None:
    """SQLite's "database or disk is full" reaches a job inside SQLAlchemy's autoflush wording
    inside an MlflowException (the second hostile round read only the autoflush): the run ends
    KILLED, resumable, and its reason says the disk is full."""
    from mlflow.exceptions import MlflowException

    from workbench.sweep.jobs import describe_environment_failure, is_environment_failure

    exc = MlflowException(
        "(raised as a result of Query-invoked autoflush; consider using a session.no_autoflush "
        "block if this flush is occurring prematurely)\n(sqlite3.OperationalError) database or "
        "disk is full\n[SQL: INSERT INTO metrics ...]"
    )
    assert is_environment_failure(exc)
    assert describe_environment_failure(exc) == (
        "the tracking store's disk is full (SQLite: database or disk is full)"
    )
