"""ATen ops and host syncs of a forward: launch overhead measured the way a CPU can, for `annotate bench` and tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a device value on the host, or whose output shape depends on values (so the host must wait).
SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",  # .item(), int(t), float(t), bool(t)
        "aten.is_nonzero",
        "aten.nonzero",
        "aten.masked_select",
        "aten.unique",
        "aten._unique",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten.equal",
    }
)


# Kernels that compute rather than move bytes: matrix products and attention. Every other op that is not a view is
# memory-bound on a GPU (elementwise, norms, casts, copies, gathers), and its bytes are what it costs there.
MATMUL_OPS = frozenset(
    {
        "aten.mm",
        "aten.addmm",
        "aten.bmm",
        "aten.baddbmm",
        "aten._addmm_activation",
        "aten.linear",
        "aten.matmul",
        "aten.conv3d",
        "aten.convolution",
    }
)
# No kernel: allocations, and views whose schema does not say they alias (`_unsafe_view` is reshape's view).
NO_KERNEL_OPS = frozenset(
    {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten._unsafe_view", "aten.lift_fresh"}
)


@dataclass
class OpCount:
    """ATen ops dispatched while counting, by name, the host syncs among them, and the bytes that memory-bound ops
    (all but matrix products, attention, views and allocations) read and write."""

    ops: Counter[str] = field(default_factory=Counter)
    syncs: Counter[str] = field(default_factory=Counter)
    memory_bytes: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def sync_total(self) -> int:
        return sum(self.syncs.values())

    @property
    def memory_total(self) -> int:
        return sum(self.memory_bytes.values())


def _stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a kernel touches in `tensor`: broadcast (stride 0) dimensions count once."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


# Ops that move only some rows of a tensor: a gather reads its index and the rows it takes, and writes them; a
# scatter reads its index and its source, and writes as many elements into `self`.
GATHER_OPS = frozenset({"aten.embedding", "aten.index_select", "aten.gather"})
SCATTER_OPS = frozenset({"aten.index_copy_", "aten.index_copy", "aten.index_add_", "aten.scatter_", "aten.scatter"})


def memory_bytes(func: Any, name: str, args: tuple, kwargs: dict, result: Any) -> int:
    """Bytes read and written by one memory-bound op as a GPU kernel moves them (its inputs in their own dtypes: CUDA
    casts as it loads); 0 for a matrix product, attention, a view or an allocation.

    What a kernel reads and writes for the kernels that ATen ops are, outside inference mode; inside it, composite
    ops such as `to` or `reshape` arrive whole and, since they may return a view, count as one (`memory_traffic`
    counts outside it). Composite ops a GPU runs as one kernel are counted as the CPU decomposes them (RMSNorm).
    """
    if name in MATMUL_OPS or name in NO_KERNEL_OPS or "attention" in name:
        return 0
    schema = func._schema
    if all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return 0  # a view
    inputs = list(_tensors(args))
    if name in GATHER_OPS:  # (weight or self, indices) or (self, dim, index)
        index = next(t for t in inputs[1:] if not t.is_floating_point())
        return _stored_bytes(index) + 2 * sum(_stored_bytes(t) for t in _tensors(result))
    if name in SCATTER_OPS:  # (self, dim, index, source): the index and source read, as much written
        index, source = inputs[1], inputs[-1]
        return _stored_bytes(index) + 2 * _stored_bytes(source)
    if name == "aten.copy_":  # (self, src): src read, self written
        return _stored_bytes(inputs[1]) + _stored_bytes(inputs[0])
    written_only = {
        a.name for a in schema.arguments if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
    }  # out= arguments
    read = [*inputs, *(t for key, value in kwargs.items() if key not in written_only for t in _tensors(value))]
    return sum(_stored_bytes(t) for t in read) + sum(_stored_bytes(t) for t in _tensors(result))


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNC_OPS:
        return True
    if name == "aten.repeat_interleave" and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
        return True  # tensor repeats without output_size: the length is read from the device
    if name in ("aten.index", "aten.index_put", "aten.index_put_"):
        indices = args[1] if len(args) > 1 else ()
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)  # boolean indexing
    if name in ("aten._to_copy", "aten.copy_") and not kwargs.get("non_blocking", False):
        source = args[1] if name == "aten.copy_" else args[0]
        target = args[0].device if name == "aten.copy_" else kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu"
    return False


class _Counting(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        kernel = not name.startswith("prim.")  # prim.*: metadata queries of fake tensors, not kernels
        if kernel:
            self.count.ops[name] += 1
            if _is_sync(name, args, kwargs):
                self.count.syncs[name] += 1
        result = func(*args, **kwargs)
        moved = memory_bytes(func, name, args, kwargs, result) if kernel else 0
        if moved:
            self.count.memory_bytes[name] += moved
        return result


@contextmanager
def count_ops() -> Iterator[OpCount]:
    """Count every ATen op dispatched in the block, and the host syncs among them.

    `Tensor.tolist()` reads a CPU tensor's memory without dispatching an op, so it is counted by hand: on a GPU
    it is a copy to the host and a sync.
    """
    count = OpCount()
    own = "tolist" in vars(torch.Tensor)
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        count.syncs["Tensor.tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with _Counting(count):
            yield count
    finally:
        if own:
            torch.Tensor.tolist = original
        else:
            del torch.Tensor.tolist


@dataclass
class ForwardCounts:
    """What one batch costs the host: ops by stage, and the host syncs from collate to queued results; and what the
    forward's memory-bound ops cost a GPU: bytes they read and write (`memory_bytes`)."""

    images: int
    collate_ops: int
    vision_ops: int
    forward_ops: int
    host_syncs: int
    sync_ops: dict[str, int]
    vision_memory_bytes: int | None = None  # None: not counted
    forward_memory_bytes: int | None = None
    memory_ops: dict[str, int] = field(default_factory=dict)  # the forward's memory-bound bytes by op

    def summary(self) -> dict[str, Any]:
        summary = {
            "vision_ops_per_image": round(self.vision_ops / self.images, 2),
            "vision_ops": self.vision_ops,
            "forward_ops": self.forward_ops,
            "forward_ops_per_image": round(self.forward_ops / self.images, 2),
            "collate_ops": self.collate_ops,
            "host_syncs_per_batch": self.host_syncs,
            "sync_ops": self.sync_ops,
        }
        if self.vision_memory_bytes is None or self.forward_memory_bytes is None:
            return summary
        megabytes = 1e6 * self.images
        return {
            **summary,
            "vision_memory_mb_per_image": round(self.vision_memory_bytes / megabytes, 1),
            "forward_memory_mb_per_image": round(self.forward_memory_bytes / megabytes, 1),
            "memory_mb_per_image_by_op": {  # the ops that move 1% of the bytes or more
                name: round(moved / megabytes, 1)
                for name, moved in sorted(self.memory_ops.items(), key=lambda item: -item[1])
                if moved >= self.forward_memory_bytes / 100
            },
        }


@contextmanager
def counting_vision(visual: Any, counts: dict[str, OpCount]) -> Iterator[None]:
    """Count the vision tower's ops into counts["vision"]: from the first of `visual`, its patch embedding or its
    rotary table to the end of `visual.merger`, which both forwards call. (On a GPU the lean
    forward's patch embedding is a product that calls no module: its ops then count for the forward only.)"""
    from contextlib import ExitStack

    vision = ExitStack()

    def vision_starts(module: Any, args: Any) -> None:
        if "vision" not in counts:
            counts["vision"] = vision.enter_context(count_ops())

    hooks = [
        visual.register_forward_pre_hook(vision_starts),
        visual.patch_embed.register_forward_pre_hook(vision_starts),
        visual.rotary_pos_emb.register_forward_pre_hook(vision_starts),
        visual.merger.register_forward_hook(lambda *_: vision.close()),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        vision.close()


def memory_traffic(scorer: Any, rows: list) -> tuple[OpCount, OpCount]:
    """The forward of `rows` counted kernel by kernel (outside inference mode, where composite ops such as `to` and
    `reshape` arrive as the copies or views they are): the vision tower's count and the whole forward's."""
    counts: dict[str, OpCount] = {}
    inputs = scorer.collate(rows)
    with torch.no_grad(), counting_vision(scorer.loaded.model.model.visual, counts), count_ops() as whole:
        scorer.logits(inputs)
    return counts["vision"], whole


def count_launch(scorer: Any, rows: list, memory: bool = True) -> ForwardCounts:
    """Count the ops of `scorer.launch(rows)`: collate, the vision tower, the whole forward, and every host sync;
    and with `memory` the bytes the forward's memory-bound kernels move (`memory_traffic`: a second forward).

    Reading the results (the returned function) is the one sync the design allows; it is not called here.
    """
    counts: dict[str, OpCount] = {}

    def counted(name: str, method: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with count_ops() as count:
                result = method(*args, **kwargs)
            counts[name] = count
            return result

        return wrapper

    scorer.collate, scorer.logits = counted("collate", scorer.collate), counted("forward", scorer.logits)
    try:
        with counting_vision(scorer.loaded.model.model.visual, counts), count_ops() as launch:
            scorer.launch(rows)
    finally:
        del scorer.collate, scorer.logits
    result = ForwardCounts(
        len(rows),
        counts["collate"].total,
        counts["vision"].total,
        counts["forward"].total,
        launch.sync_total,
        dict(launch.syncs),
    )
    if memory:
        vision, forward = memory_traffic(scorer, rows)
        result.vision_memory_bytes, result.forward_memory_bytes = vision.memory_total, forward.memory_total
        result.memory_ops = dict(forward.memory_bytes)
    return result


def qwen2_vl_2b(reduced: bool, dtype: torch.dtype = torch.float32) -> Any:
    """Qwen2-VL-2B's architecture with random weights and the tiny tokenizer, for counting ops (CPU).

    Op counts depend on depth and on the code path, not on widths or values; bytes on all of them, so they are
    counted at full size in the GPU's dtype (bfloat16). Full size (`reduced` false) lives on
    fake tensors: no memory and no compute, and any read of a value raises, so only a sync-free forward runs on
    it. `reduced` keeps every layer, head grouping and rotary section but shrinks the widths, on real tensors,
    for forwards that read values (transformers' own).
    """
    from transformers import Qwen2VLForConditionalGeneration

    from annotator.models import (
        IMAGE_MEAN,
        IMAGE_STD,
        QWEN2_VL_2B_TEXT,
        QWEN2_VL_2B_VISION,
        RANDOM_2B,
        LoadedModel,
        _qwen2_vl_config,
        build_tiny_tokenizer,
    )

    tokenizer = build_tiny_tokenizer()
    text, vision = dict(QWEN2_VL_2B_TEXT), dict(QWEN2_VL_2B_VISION)
    if reduced:
        text.update(hidden_size=12, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1)
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [1, 1, 1]}
        vision.update(embed_dim=4, num_heads=1, hidden_size=12)
    config = _qwen2_vl_config(tokenizer, text, vision)
    config._attn_implementation = "sdpa"
    if reduced:
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
    model.eval().requires_grad_(False)
    name = f"{RANDOM_2B} ({'reduced width' if reduced else 'fake tensors'}, {str(dtype).removeprefix('torch.')})"
    return LoadedModel(model, tokenizer, IMAGE_MEAN, IMAGE_STD, name, torch.device("cpu"), dtype)


@contextmanager
def on_fake_tensors(loaded: Any) -> Iterator[None]:
    """Run on the fake tensors of `loaded` (a no-op for real ones): host tensors become fake as ops use them."""
    from torch._subclasses.fake_tensor import FakeTensor

    weight = next(loaded.model.parameters())
    if not isinstance(weight, FakeTensor):
        yield
        return
    with weight.fake_mode:
        yield
