"""Prefect 3 flow ``grounding``: the same stage functions DVC runs, so both share one cache.

No logic lives here. Each task calls :func:`grounding.stages.run`, which returns ``(path, key, hit)`` at
once when the stage's record says its outputs are current for today's key — whether DVC, Prefect or a person
made them. Prefect's own result cache is off on purpose (``NO_CACHE``): the engine's record is the one cache,
so an output deleted by hand is recomputed and one made by ``dvc repro`` is reused.

Fan-out: with ``fan_out=N`` each shard-set stage runs as N part tasks on a Dask cluster (a local one, or
``dask_address``), each writing a disjoint subset of shards, then one commit task writes the manifest.
The result is byte-identical to the serial run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from grounding import config, errors, stages
from grounding.stage_writer import shard_part

#: Deployment name -> the stages it must bring up to date (their upstream stages are added by `plan`).
TARGETS: dict[str, tuple[str, ...]] = {
    "refclip-teacher": ("refclip-export",),
    "clip-teacher": ("clip-image", "clip-text", "clip-classes", "clip-crops", "qam"),
    "detector-teacher": ("frcnn-proposals", "fcos-points", "yolo-anchors"),
    "wordnet-labels": ("wordnet-labels",),
    "students": ("evaluate",),
    "all": stages.PIPELINE,
}


def stages_for(target: str, params: config.Params | None = None) -> list[str]:
    """The registered stages a target runs for ``params`` (``None``: the defaults), in dependency order;
    unknown target → ``KeyError``."""
    if target in TARGETS:
        wanted = [s for s in TARGETS[target] if s in stages.STAGES]
        if not wanted:
            raise KeyError(f"target {target!r} has no registered stages yet ({TARGETS[target]})")
    elif target in stages.STAGES:
        wanted = [target]
    else:
        raise KeyError(f"unknown target {target!r}; targets are {sorted(TARGETS)} or a stage in {sorted(stages.STAGES)}")
    return stages.plan(wanted, params)


@task(name="stage", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[5], task_run_name="{name}")
def stage_task(name: str, params_doc: dict[str, Any]) -> str:
    """Run (or reuse) one stage; returns its output path and logs "cache hit" when the engine found it
    current (whoever made it: DVC, Prefect or ``grounding run``)."""
    r = _run(name, params_doc)
    if isinstance(r, State):
        return r
    get_run_logger().info("%s: %s", name, "cache hit (up to date)" if r.hit else f"ran → {r.path}")
    return str(r.path)


def _run(name: str, params_doc: dict[str, Any]) -> stages.StageResult | State:
    """``stages.run``; a known error (grounding.errors) is logged as one line and returned as a Failed
    state carrying that line (no traceback: the message names the file or key and the fix)."""
    try:
        return stages.run(name, config.from_dict(params_doc), deps=False)  # the flow runs them in plan order
    except errors.KNOWN as e:
        msg, _ = errors.one_line(e, f"stage {name}")
        get_run_logger().error("%s", msg)
        return Failed(message=msg)


@task(name="stage-part", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[5],
      task_run_name="{name}[{part}/{n_parts}]")
def stage_part_task(name: str, params_doc: dict[str, Any], part: int, n_parts: int) -> str:
    """Write the shards ``i % n_parts == part`` of one stage (no manifest)."""
    with shard_part(part, n_parts):
        r = _run(name, params_doc)
    return r if isinstance(r, State) else str(r.path)


@flow(name="grounding-fan-out")
def fan_out_flow(name: str, params_doc: dict[str, Any], n_parts: int) -> str:
    """Run the parts of one stage concurrently on this flow's task runner, then commit."""
    futures = [stage_part_task.submit(name, params_doc, i, n_parts) for i in range(n_parts)]
    for f in futures:
        f.wait()
    failed = [f.state for f in futures if f.state.is_failed()]
    if failed:  # the part logged its one-line error; no traceback here
        return Failed(message=failed[0].message)
    return stage_task(name, params_doc)


def dask_runner(n_workers: int, address: str | None = None):
    """A DaskTaskRunner: on an existing cluster at ``address`` or a local cluster of worker processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@flow(name="grounding", log_prints=True)
def grounding_flow(target: str = "all", params_file: str = "params.yaml", overrides: list[str] | None = None,
                   dataset: str | None = None, fan_out: int = 1, dask_address: str | None = None) -> dict[str, str]:
    """Bring ``target``'s stages up to date; returns ``stage -> output directory``.

    Args:
        target: a deployment target (``refclip-teacher``, ``clip-teacher``, ...) or one stage name.
        params_file: the params YAML (relative to the working directory).
        overrides: ``key.path=value`` overrides, validated like ``--set``.
        dataset: shortcut for the override ``dataset.name=<dataset>``.
        fan_out: number of parts for shard-set stages (1: serial).
        dask_address: a running Dask scheduler for the parts (default: a local cluster).
    """
    log = get_run_logger()
    extra = [f"dataset.name={dataset}"] if dataset else []
    try:
        params = config.load(params_file, [*(overrides or []), *extra])
        names = stages_for(target, params)  # a *_from param naming no teacher stage: ConfigError
    except config.ConfigError as e:  # one line naming the key, no traceback
        msg, _ = errors.one_line(e)
        log.error("%s", msg)
        return Failed(message=msg)
    doc = params.model_dump(mode="json", by_alias=True)  # aliases (e.g. teachers.clip.model_config) re-validate
    outputs: dict[str, str] = {}
    for name in names:
        if fan_out > 1 and stages.get(name).fan_out:
            runner = dask_runner(fan_out, dask_address)
            state = fan_out_flow.with_options(task_runner=runner)(name, doc, fan_out, return_state=True)
        else:
            state = stage_task(name, doc, return_state=True)
        if state.is_failed():  # a known error was logged as one line by the task; stop there, no traceback
            return Failed(message=state.message)
        outputs[name] = state.result()
        log.info("%s → %s", name, outputs[name])
    return outputs
