"""CUDA graphs of the forward pass, one per batch shape: captured once a shape recurs, then replayed."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

# Whether `model.cuda_graphs: auto` captures graphs on a GPU: only where measured to win. On an H100 (2026-11-25,
# docs/performance.md) they did not: a batch of 64 seed-sized pairs keeps the GPU busy for 730 ms either way.
GRAPHS_WIN = False
MAX_GRAPHS = 16  # shapes with a graph; further shapes run eagerly (each graph holds its own static inputs)
LENGTH_STEP = 16  # with graphs, batches are left padded to a multiple of this many tokens so that shapes recur


def use_graphs(setting: str, forward: str, device: torch.device) -> bool:
    """Whether `model.cuda_graphs` (auto, on, off) captures graphs: the lean forward on a CUDA device only."""
    if forward != "lean" or device.type != "cuda":
        return False
    return setting == "on" or (setting == "auto" and GRAPHS_WIN)


def tensors(value: Any) -> list[torch.Tensor | None]:
    """The tensors of a batch (a dataclass, nested dataclasses walked), in field order; None stays a slot."""
    found: list[torch.Tensor | None] = []
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if dataclasses.is_dataclass(item):
            found.extend(tensors(item))
        elif item is None or isinstance(item, torch.Tensor):
            found.append(item)
    return found


def with_tensors(value: Any, replacements: list[torch.Tensor | None]) -> Any:
    """`value` with its tensors (in `tensors` order) replaced by `replacements`, which is consumed."""
    changes = {}
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if dataclasses.is_dataclass(item):
            changes[field.name] = with_tensors(item, replacements)
        elif item is None or isinstance(item, torch.Tensor):
            changes[field.name] = replacements.pop(0)
    return dataclasses.replace(value, **changes)


def shape_key(value: Any) -> tuple:
    """What a graph is specific to: every tensor's shape and dtype, and every other field's value."""
    key: list[Any] = []
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if dataclasses.is_dataclass(item):
            key.append(shape_key(item))
        elif isinstance(item, torch.Tensor):
            key.append((tuple(item.shape), item.dtype))
        else:
            key.append(item)
    return tuple(key)


@dataclasses.dataclass
class Graph:
    """One captured forward: the static inputs it reads and the output it writes, for one shape."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor | None]
    output: torch.Tensor

    def run(self, batch: Any) -> torch.Tensor:
        for static, new in zip(self.inputs, tensors(batch), strict=True):
            if static is not None:
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites `output`


class GraphedForward:
    """`forward(batch) -> tensor` with a CUDA graph per batch shape, where the shape recurs.

    The first batch of a shape runs eagerly; the second is copied into static inputs, run once on a side stream
    (its result, and the warm-up that allocates the kernels' workspaces there) and captured; later ones copy
    their tensors into the static inputs and replay: one launch instead of thousands, and no host sync. Graphs
    share one memory pool (they never run at the same time). At most `max_graphs` shapes get a graph; others
    run eagerly, so an unbounded variety of shapes costs no memory.
    """

    def __init__(self, forward: Callable[[Any], torch.Tensor], device: torch.device, max_graphs: int = MAX_GRAPHS):
        self.forward = forward
        self.device = device
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, Graph] = {}
        self.seen: Counter[tuple] = Counter()
        self.failed: set[tuple] = set()  # shapes whose capture raised (out of memory, say): eager from then on
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.counts = Counter({"eager": 0, "captured": 0, "replayed": 0})

    def __call__(self, batch: Any) -> torch.Tensor:
        key = shape_key(batch)
        graph = self.graphs.get(key)
        if graph is not None:
            self.counts["replayed"] += 1
            return graph.run(batch)
        self.seen[key] += 1
        if self.seen[key] < 2 or len(self.graphs) >= self.max_graphs or key in self.failed:
            if len(self.seen) > 64 * self.max_graphs:  # bounded: forget shapes seen once, long ago
                self.seen = Counter({k: n for k, n in self.seen.items() if n > 1})
            self.counts["eager"] += 1
            return self.forward(batch)
        self.counts["captured"] += 1
        return self._capture(key, batch)

    def _capture(self, key: tuple, batch: Any) -> torch.Tensor:
        """Run `batch` from fresh static inputs on the side stream, capture that forward, keep the graph."""
        current = torch.cuda.current_stream(self.device)
        inputs = [None if t is None else t.clone() for t in tensors(batch)]
        static = with_tensors(batch, list(inputs))
        self.stream.wait_stream(current)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            result = self.forward(static)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a CUDA call from another thread (pinning, say) does not invalidate the capture
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                output = self.forward(static)
            except BaseException:
                self.failed.add(key)
                raise
            finally:
                graph.capture_end()
        current.wait_stream(self.stream)
        result.record_stream(current)  # made on the side stream, read and freed on the current one
        self.graphs[key] = Graph(graph, inputs, output)
        return result
