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


@dataclass
class OpCount:
    """ATen ops dispatched while counting, by name, and the host syncs among them."""

    ops: Counter[str] = field(default_factory=Counter)
    syncs: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def sync_total(self) -> int:
        return sum(self.syncs.values())


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
        if not name.startswith("prim."):  # metadata queries of fake tensors, not kernels
            self.count.ops[name] += 1
            if _is_sync(name, args, kwargs):
                self.count.syncs[name] += 1
        return func(*args, **kwargs)


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
    """What one batch costs the host: ops by stage, and the host syncs from collate to queued results."""

    images: int
    collate_ops: int
    vision_ops: int
    forward_ops: int
    host_syncs: int
    sync_ops: dict[str, int]

    def summary(self) -> dict[str, Any]:
        return {
            "vision_ops_per_image": round(self.vision_ops / self.images, 2),
            "vision_ops": self.vision_ops,
            "forward_ops": self.forward_ops,
            "forward_ops_per_image": round(self.forward_ops / self.images, 2),
            "collate_ops": self.collate_ops,
            "host_syncs_per_batch": self.host_syncs,
            "sync_ops": self.sync_ops,
        }


def count_launch(scorer: Any, rows: list) -> ForwardCounts:
    """Count the ops of `scorer.launch(rows)`: collate, the vision tower, the whole forward, and every host sync.

    The vision tower runs from the first of `visual`/`visual.patch_embed` to the end of `visual.merger`, which
    both forwards call. Reading the results (the returned function) is the one sync the design allows; it is
    not called here.
    """
    from contextlib import ExitStack

    counts: dict[str, OpCount] = {}
    vision = ExitStack()

    def counted(name: str, method: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with count_ops() as count:
                result = method(*args, **kwargs)
            counts[name] = count
            return result

        return wrapper

    def vision_starts(module: Any, args: Any) -> None:
        if "vision" not in counts:
            counts["vision"] = vision.enter_context(count_ops())

    visual = scorer.loaded.model.model.visual
    hooks = [
        visual.register_forward_pre_hook(vision_starts),
        visual.patch_embed.register_forward_pre_hook(vision_starts),
        visual.merger.register_forward_hook(lambda *_: vision.close()),
    ]
    scorer.collate, scorer.logits = counted("collate", scorer.collate), counted("forward", scorer.logits)
    try:
        with count_ops() as launch:
            scorer.launch(rows)
    finally:
        del scorer.collate, scorer.logits
        for hook in hooks:
            hook.remove()
        vision.close()
    return ForwardCounts(
        len(rows),
        counts["collate"].total,
        counts["vision"].total,
        counts["forward"].total,
        launch.sync_total,
        dict(launch.syncs),
    )


def qwen2_vl_2b(reduced: bool) -> Any:
    """Qwen2-VL-2B's architecture with random weights and the tiny tokenizer, for counting ops (fp32, CPU).

    Op counts depend on depth and on the code path, not on widths or values. Full size (`reduced` false) lives on
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
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.float32)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
    model.eval().requires_grad_(False)
    name = f"{RANDOM_2B} ({'reduced width' if reduced else 'fake tensors'})"
    return LoadedModel(model, tokenizer, IMAGE_MEAN, IMAGE_STD, name, torch.device("cpu"), torch.float32)


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
