"""Ray engine: writers as Ray actors (Ray Core, not Ray Data), one GPU each, scheduled by the same coordinator.

Ray only places the writers and carries messages; windows, requeues and commits are the coordinator's, as on one
machine. Each actor runs a `WindowScorer` in a thread and answers three calls: `start`, `give` and `events` (a
long poll). An actor that dies (its node lost, killed, out of memory) surfaces as a `RayActorError` on its poll:
the coordinator hands its windows to the others and starts a new actor in its place.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import socket
import threading
from dataclasses import replace
from typing import Any

from annotator.errors import AnnotatorError
from annotator.executors import SlotExecutor, drain, host_writer
from annotator.ray_address import check_address
from annotator.recipe import RayConfig
from annotator.writer import WindowScorer, WriterSpec

RAY_VERSIONS = ((2, 40), (3, 0))  # the range pyproject's `ray` extra allows; 2.60 is what CI runs
INSTALL = 'pip install -e ".[ray]"'
POLL_S = 1.0  # how long an actor holds an `events` call open when it has nothing to say


_started_here = False  # whether this process started the Ray it is connected to (then it stops it)


def connect(config: RayConfig) -> tuple[int, float, bool]:
    """Check Ray, join (or start) the cluster and plan the writers: every mistake is an error before anything is
    written. Returns `plan_writers`' plan."""
    global _started_here
    check_ray()
    import ray

    if not ray.is_initialized():
        # A Ray of our own when `address` is null (Ray still honours RAY_ADDRESS); `auto` joins this node's cluster.
        check_address(config.address)  # one that is not there: an error in seconds, not minutes of Ray's retries
        try:
            ray.init(address=config.address, include_dashboard=False, logging_level=logging.WARNING)
        except Exception as exc:  # Ray raises plain exceptions too (a node that timed out starting)
            where = "a new local Ray" if config.address is None else f"the Ray cluster at {config.address!r}"
            reason = str(exc).strip().splitlines()[0].rstrip(".")
            raise AnnotatorError(
                f"Could not start or join {where}: {reason}. Start the cluster first "
                "(`ray start --head` on one node, `ray start --address=HEAD:6379` on the others), run `annotate` on a "
                "node of it, or set `engine.ray.address: null` to start a Ray on this machine."
            ) from None
        _started_here = True
    return plan_writers(config, ray.cluster_resources())


def check_ray() -> None:
    """`engine.kind: ray` needs Ray in this environment: a clear user error, before anything is written, if not."""
    try:
        import ray
    except ImportError:
        raise AnnotatorError(
            "`engine.kind: ray` needs Ray, which is not installed here. Install annotator's Ray extra "
            f"(`{INSTALL}` in a checkout, or `pip install 'ray>=2.40,<3'`) on this machine and every node of the "
            "cluster, or run on this machine with `engine.kind: local` (`--devices cuda:0,cuda:1`)."
        ) from None
    found = tuple(int(part) for part in ray.__version__.split(".")[:2] if part.isdigit())
    low, high = RAY_VERSIONS
    if not low <= found < high:
        raise AnnotatorError(
            f"annotator works with Ray >=2.40,<3; this environment has Ray {ray.__version__}. Install a version in "
            "that range (`pip install 'ray>=2.40,<3'`) here and on every node."
        )


class RayWriter:
    """A writer as a Ray actor (threaded: `events` waits while `give` and `stop` come in)."""

    def __init__(self, spec: WriterSpec) -> None:
        import ray

        gpus = ray.get_gpu_ids()
        label = f"cuda:{gpus[0]}" if gpus else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES: the actor sees one GPU
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.writer = WindowScorer(replace(spec, device="cuda" if gpus else "cpu", label=label), self._emit)

    def _emit(self, kind: str, value: Any) -> None:
        self._events.put((kind, value))

    def start(self) -> dict[str, Any]:
        threading.Thread(target=host_writer, args=(self.writer, self._emit, False), daemon=True).start()
        return {"host": socket.gethostname(), "pid": os.getpid(), "label": self.writer.label}

    def give(self, messages: list[tuple[str, Any]]) -> None:
        for kind, value in messages:
            if kind == "stop":
                self.writer.stop()
            else:
                self.writer.give(kind, value)

    def events(self, timeout: float) -> list[tuple[str, Any]]:
        return drain(self._events, timeout)


def plan_writers(config: RayConfig, resources: dict[str, float]) -> tuple[int, float, bool]:
    """(writers, CPUs each, on GPUs?) for a cluster's resources; a plan that could never be placed is an error."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    free = cpus - config.reserved_cpus
    if gpus:
        workers = config.workers or gpus
        if workers > gpus:
            raise AnnotatorError(
                f"`engine.ray.workers` is {workers}, but the Ray cluster has {gpus} GPU(s): one writer per GPU. "
                "Set it to at most that, or null for every GPU."
            )
        each = config.cpus_per_worker or (math.floor(free / workers) if free >= workers else free / workers)
    else:
        each = config.cpus_per_worker or 1.0
        workers = config.workers or max(1, math.floor(free / each))
    if each <= 0 or workers * each > free + 1e-9:
        raise AnnotatorError(
            f"The Ray cluster has {cpus:g} CPUs; {workers} writer(s) of {each:g} CPU(s) each would leave fewer than "
            f"`engine.ray.reserved_cpus` = {config.reserved_cpus:g} free (kept for Ray itself and reading, so that "
            "nothing waits forever for a CPU). Lower `engine.ray.workers` or `engine.ray.cpus_per_worker`, or add "
            "nodes."
        )
    return workers, each, bool(gpus)


class RayExecutor(SlotExecutor):
    """Writers as Ray actors: one per GPU of the cluster (or CPU actors where it has none)."""

    def __init__(self, spec: WriterSpec, config: RayConfig) -> None:
        self.count, cpus, self.on_gpus = connect(config)
        threads, workers = max(1, int(cpus)), spec.recipe.batching.workers
        self.spec = replace(spec, cpu_threads=threads, workers=max(0, threads - 1) if workers == "auto" else workers)
        self.options = {"num_cpus": cpus, "num_gpus": 1 if self.on_gpus else 0, "max_concurrency": 4}
        self.detail = f"{'one GPU' if self.on_gpus else 'no GPU'} and {cpus:g} CPU(s) each"
        self._actors: dict[int, Any] = {}
        self._polls: dict[Any, int] = {}  # outstanding `events` calls -> writer
        self._labels = {index: f"Ray writer {index}" for index in range(self.count)}
        self._outbox: dict[int, list[tuple[str, Any]]] = {}  # messages to send at the next `events`, in order

    def label(self, index: int) -> str:
        return self._labels[index]

    def describe(self) -> str:
        return self.detail

    def _launch(self, index: int) -> None:
        import ray

        old = self._actors.pop(index, None)
        if old is not None:
            ray.kill(old, no_restart=True)  # a writer that failed: its actor is still there, idle
        actor = ray.remote(RayWriter).options(**self.options).remote(self.spec)
        self._actors[index] = actor
        actor.start.remote()
        self._polls[actor.events.remote(POLL_S)] = index

    def events(self, timeout: float) -> list[tuple[str, int, Any]]:
        import ray
        from ray.exceptions import RayError

        self._flush()
        if not self._polls:
            return []
        ready, _ = ray.wait(list(self._polls), num_returns=1, timeout=timeout)
        if ready:
            rest = [ref for ref in self._polls if ref not in ready]
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0] if rest else []
        found: list[tuple[str, int, Any]] = []
        for ref in ready:
            index = self._polls.pop(ref)
            try:
                events = ray.get(ref)
            except RayError as exc:
                self._actors.pop(index, None)
                found.append(("died", index, f"Ray: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"))
                continue
            for kind, value in events:
                if kind == "loaded":
                    self._labels[index] = f"{value['label']} on {value['host']} (Ray writer {index})"
                found.append((kind, index, value))
            if not any(kind in ("exited", "failed") for kind, _ in events):
                self._polls[self._actors[index].events.remote(POLL_S)] = index
        return found

    def give(self, index: int, kind: str, value: Any = None) -> None:
        self._outbox.setdefault(index, []).append((kind, value))

    def _flush(self) -> None:
        """Send what was given, one call per actor, waited for: calls to a threaded actor may run out of order."""
        import ray
        from ray.exceptions import RayError

        calls = [self._actors[i].give.remote(m) for i, m in self._outbox.items() if m and i in self._actors]
        self._outbox.clear()
        for call in calls:
            with contextlib.suppress(RayError):  # a dead actor: its poll says so
                ray.get(call)

    def stop(self, index: int) -> None:
        self.give(index, "stop")
        self._flush()

    def kill(self) -> None:
        """For a signal handler about to exit at once: nothing to do, Ray kills the actors of a driver that exits."""

    def close(self) -> None:
        global _started_here
        import ray

        for actor in self._actors.values():
            ray.kill(actor, no_restart=True)
        self._actors.clear()
        self._polls.clear()
        if _started_here:
            ray.shutdown()
            _started_here = False
