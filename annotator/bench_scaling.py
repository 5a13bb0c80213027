"""`annotate bench --devices ...`: scaling efficiency of N writers against one, coordinator overhead, Ray start-up.

Both runs give each writer the same share of the machine (the cores of N writers shared out, one GPU each), so
the efficiency, pairs/s with N writers / (N x pairs/s with one), shows what scheduling costs. Windows are handed
out once every writer has loaded its model, and rates are steady ones: from the first batch scored to the last.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from annotator.errors import AnnotatorError


def _timed_coordinator(make_executor):
    """The real run (`run.Annotator`) with the executor given, noting when rows are scored."""
    from annotator.run import Annotator

    class Timed(Annotator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.marks: list[tuple[float, int]] = []
            self.wait_for_every_writer = True  # N writers from the first window on

        def _executor(self) -> Any:
            return make_executor(self._writer_spec())

        def _advance(self, scored: int, errors: int) -> None:
            super()._advance(scored, errors)
            self.marks.append((time.monotonic(), self.rows_done))

    return Timed


def timed_run(recipe: Any, make_executor, console: Any) -> dict[str, Any]:
    """One run of `recipe` by the executor `make_executor(spec)` makes: steady pairs/s, start-up, coordinator CPU."""
    from annotator.start import prepare_run

    folder, source = prepare_run(recipe, overwrite=True)  # its checks include the engine's
    run = _timed_coordinator(make_executor)(recipe, folder, source, console, progress=False, fresh=True)
    summary = run.run()
    coordinator = run.coordinator
    ready = max(coordinator.loaded_at)
    steady = [(t, rows) for t, rows in run.marks if t >= ready]
    rate = None
    if len(steady) >= 2 and steady[-1][0] > steady[0][0]:
        rate = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])  # after the first batch
    return {
        "writers": run.executor.count,
        "pairs_per_s": round(rate, 3) if rate else None,
        "whole_run_pairs_per_s": summary["rows_per_s"],
        "writers_ready_s": round(ready - coordinator.started_at, 2),
        "coordinator_ms_per_window": round(1000 * coordinator.cpu_seconds / max(1, summary["windows"]), 3),
        "windows": summary["windows"],
    }


def run_scaling(config: Any, parquet: Path, devices: list[str], console: Any) -> dict[str, Any]:
    """One writer, then one per device, then (`--ray`) as many Ray actors, on the same synthetic pairs."""
    from annotator.bench import bench_recipe
    from annotator.executors import ProcessExecutor, available_cores, local_executor, share_cores

    if len(devices) < 2:
        raise AnnotatorError("--devices for a scaling benchmark names at least two devices, e.g. cpu,cpu.")
    writers = len(devices)
    window = config.window or max(8, config.pairs // (8 * writers))  # several windows per writer
    if -(-config.pairs // window) < 2 * writers:
        raise AnnotatorError(
            f"--pairs {config.pairs} makes {-(-config.pairs // window)} window(s) of {window} rows for {writers} "
            f"writers: a scaling figure needs at least two windows per writer, or some writers never work. Give "
            f"--pairs {2 * writers * window} or more, or a smaller --window."
        )
    cores = available_cores()
    results: dict[str, Any] = {"devices": ",".join(devices), "cores": cores, "pairs": config.pairs, "window": window}
    with tempfile.TemporaryDirectory(prefix="annotate-bench-scaling-") as tmp:

        def recipe(name: str, **engine: Any) -> Any:
            base = bench_recipe(config, parquet, Path(tmp) / name)
            data = base.model_dump(mode="json")
            data["batching"]["window"] = window
            data["model"]["device"] = "auto"  # the devices are the engine's
            data["engine"] = {**data["engine"], **engine}
            return type(base).model_validate(data)

        def one_writer(spec: Any) -> Any:
            # A child process with one writer's share of the machine, as each of the N gets.
            threads, workers = share_cores(spec.recipe, writers, cores)
            device = devices[0]
            cuda = int(device.split(":")[1]) if device.startswith("cuda") else None
            one = replace(spec, device="cuda" if cuda is not None else device, label=device)
            return ProcessExecutor([replace(one, cpu_threads=threads, workers=workers)], [cuda])

        console.print(f"bench: {config.pairs} pairs, windows of {window}, one writer on {devices[0]}...")
        results["one_writer"] = timed_run(recipe("one"), one_writer, console)
        console.print(f"bench: {writers} writers on {', '.join(devices)}...")
        many = recipe("many", devices=devices)
        results["n_writers"] = timed_run(many, lambda spec: local_executor(spec, devices), console)
        if config.ray:
            results["ray"] = ray_run(recipe, writers, console)
    one, many = results["one_writer"]["pairs_per_s"], results["n_writers"]["pairs_per_s"]
    results["scaling_efficiency"] = round(many / (writers * one), 3) if one and many else None
    if "ray" in results and one and results["ray"]["pairs_per_s"]:
        results["ray_scaling_efficiency"] = round(results["ray"]["pairs_per_s"] / (writers * one), 3)
    if all(d == "cpu" for d in devices):
        results["note"] = (
            "CPU writers share this machine's cores (each gets cores/N threads, in both runs), so the efficiency "
            "shows what coordination costs, not what N accelerators would gain."
        )
    return results


def ray_run(recipe, writers: int, console: Any) -> dict[str, Any]:
    """`writers` CPU actors on a Ray started here: its start-up cost, then the same run."""
    from annotator.executors import available_cores
    from annotator.ray_engine import RayExecutor, check_ray

    check_ray()
    import ray

    cores = available_cores()
    console.print(f"bench: starting Ray ({cores} CPUs), then {writers} actors...")
    started = time.monotonic()
    try:
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except Exception as exc:  # Ray raises plain exceptions (a node that timed out starting on a busy machine)
        raise AnnotatorError(f"Ray did not start on this machine: {exc}. Try again when it is less busy.") from None
    init_s = time.monotonic() - started
    try:
        each = max(0.01, (cores - 1) / writers)  # one CPU reserved, the rest shared out as in the local runs
        ray_recipe = recipe("ray", kind="ray", ray={"workers": writers, "cpus_per_worker": each, "reserved_cpus": 1})
        config = ray_recipe.engine.ray
        result = timed_run(ray_recipe, lambda spec: RayExecutor(spec, config), console)
    finally:
        ray.shutdown()
    return {"ray_init_s": round(init_s, 2), **result}
