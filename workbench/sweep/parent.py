"""A sweep's parent run: the MLflow run whose children are the runs of one plan, so that
``mlflow ui`` shows a grid as one expandable row.

The rule: one parent per distinct plan. A plan's identity is a hash of its sorted run keys
(``workbench.plan``); a rerun of the same plan reuses its parent (RUNNING again while the sweep
runs, ended again after), a ``--set`` or ``--only`` that changes the set of runs has its own.
A child's ``mlflow.parentRunId`` is written once, when the child is created: a resumed run keeps
the parent it was created under, and no run is ever attached to two. A sweep with nothing to
train writes nothing, parent included; so do ``--dry-run`` and ``plan``.

The parent holds the resolved spec (``spec.yaml``), the grid's size (param ``grid_size``), how
many of its plan's runs are in each state when its last sweep ended (tags
``workbench.runs_finished``, ``workbench.runs_failed``, ...: tags, not metrics, so that the
Charts view of ``mlflow ui`` shows training curves, not seven panels of bookkeeping) and the best
val loss of its finished runs with that run's name and id (metric ``best_val_loss``, the one
number a parent of nested runs carries in MLflow's own tuning examples; tags
``workbench.best_run_name`` and ``workbench.best_run_id``).
Parents carry no ``workbench.run_key``, so no reader of runs (skip and resume, the report,
``sample``) ever takes one for a run.

Two ``workbench run`` of one plan at once find or create, and end, the parent one at a time
(a lock beside the run claims): one parent, and the last one to finish ends it. An interrupted
sweep ends it KILLED; a driver killed outright leaves it RUNNING under a dead process, and the
next ``workbench run`` or ``workbench report`` on its experiment ends it KILLED
(``tracking.end_dead_parents``); the next sweep of its plan reopens it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from workbench.grid import Plan
from workbench.naming import format_value
from workbench.sweep.claims import Claims
from workbench.tracking import (
    PLAN_TAG,
    TAG,
    RunRecord,
    RunState,
    existing_runs,
    mlflow_status,
    parent_runs,
    plan_id,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

STATES = (RunState.FINISHED, RunState.FAILED, RunState.DIVERGED, RunState.KILLED,
          RunState.STALE, RunState.RUNNING, RunState.TO_DO)  # fmt: skip
PARENT_TAG = "mlflow.parentRunId"


def state_tag(state: RunState) -> str:
    """``workbench.runs_finished``, ``workbench.runs_to_do``, ...: the tag holding the parent's
    count of its runs in ``state``."""
    return TAG + "runs_" + str(state).replace(" ", "_")


@dataclass(frozen=True)
class SweepParent:
    run_id: str
    plan: str  # the plan's identity (workbench.plan)
    attempt: int  # how many sweeps have opened it, this one included


def open_parent(
    mlflow_client: MlflowClient,
    experiment_id: str,
    plan: Plan,
    sweep_tags: dict[str, str],
    claims: Claims,
) -> SweepParent:
    """The plan's parent run, RUNNING for this sweep: found, or created with the spec."""
    from mlflow.entities import Param, RunTag

    identity = plan_id(r.key for r in plan.runs)
    with claims.holding("plan-" + identity):
        found = parent_runs(mlflow_client, experiment_id, identity)
        tags = {**sweep_tags, TAG + "heartbeat": f"{time.time():.0f}"}
        if found:
            run = found[0]  # oldest: never more than one, but a hand-made copy is passed by
            attempt = _attempt(run.data.tags) + 1
            run_id = str(run.info.run_id)
            mlflow_client.update_run(run_id, status=mlflow_status(RunState.RUNNING))
            tags[TAG + "attempt"] = str(attempt)
            mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        else:
            attempt = 1
            tags.update({PLAN_TAG: identity, TAG + "attempt": "1",
                         "mlflow.note.content": _note(plan, identity)})  # fmt: skip
            # Named after the experiment, what --set and --only made of it, and the plan: two
            # plans' parents never share a name.
            name = " ".join(filter(None, [plan.experiment, plan.made_by, f"[{identity[:8]}]"]))
            created = mlflow_client.create_run(experiment_id, run_name=name, tags=tags)
            run_id = str(created.info.run_id)
            mlflow_client.log_batch(run_id, params=[Param("grid_size", str(len(plan.runs)))])
        mlflow_client.log_text(run_id, resolved_spec(plan), "spec.yaml")  # this sweep's
    return SweepParent(run_id, identity, attempt)


def end_parent(
    mlflow_client: MlflowClient,
    tracking_uri: str,
    experiment_id: str,
    plan: Plan,
    parent: SweepParent,
    claims: Claims,
    interrupted: bool,
) -> None:
    """Count the plan's runs into the parent and end it: KILLED if this sweep was interrupted
    or left runs to resume, FAILED if runs failed or diverged, else FINISHED. While another
    process still trains runs of the plan, the parent stays RUNNING: that process ends it."""
    from mlflow.entities import Metric, RunTag

    with claims.holding("plan-" + parent.plan):
        records = existing_runs(tracking_uri, experiment_id)
        mine = {r.key: records[r.key] for r in plan.runs if r.key in records}
        counts = Counter(record.state for record in mine.values())
        counts[RunState.TO_DO] = len(plan.runs) - len(mine)
        now = int(time.time() * 1000)
        metrics = []
        tags = {state_tag(s): str(counts[s]) for s in STATES}
        best = _best(mine.values())
        if best is not None:
            metrics.append(Metric("best_val_loss", best.metrics["best_val_loss"], now, 0))
            tags[TAG + "best_run_id"] = best.run_id
            tags[TAG + "best_run_name"] = best.tags.get("mlflow.runName", "")
        mlflow_client.log_batch(
            parent.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()]
        )
        if counts[RunState.RUNNING] and not interrupted:
            return  # another live process is training runs of this plan
        if interrupted or counts[RunState.KILLED] or counts[RunState.STALE]:
            status = RunState.KILLED
        elif counts[RunState.FAILED] or counts[RunState.DIVERGED]:
            status = RunState.FAILED
        else:
            status = RunState.FINISHED
        mlflow_client.set_terminated(parent.run_id, status=mlflow_status(status))


def _best(records: Any) -> RunRecord | None:
    finished = [r for r in records if r.state is RunState.FINISHED and "best_val_loss" in r.metrics]
    return min(finished, key=lambda r: r.metrics["best_val_loss"], default=None)


def _attempt(tags: dict[str, str]) -> int:
    try:
        return max(1, int(tags.get(TAG + "attempt", "1")))
    except ValueError:
        return 1


def resolved_spec(plan: Plan) -> str:
    """The spec as validated, defaults filled in, with the ``--set`` values the runs took."""
    changed: dict[str, Any] = {}
    for run in plan.runs:
        changed.update(run.changed)
    header = f"# {plan.spec_path.name}, resolved: {len(plan.runs)} runs\n"
    if changed:
        shown = " ".join(f"{k}={format_value(v)}" for k, v in sorted(changed.items()))
        shown = " ".join(shown.splitlines())  # a comment stays one line, whatever the values
        header += f"# --set applied: {shown}\n"
    body = yaml.safe_dump(plan.spec.model_dump(mode="json"), sort_keys=False)
    return header + body


def _note(plan: Plan, identity: str) -> str:
    """The parent's description in ``mlflow ui``."""
    return (
        f"Sweep of {plan.experiment}: {len(plan.runs)} runs of {plan.spec_path.name} "
        f"(plan {identity}); the spec is spec.yaml, the report report/."
    )
