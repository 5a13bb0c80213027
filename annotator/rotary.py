"""Rotary position embedding as the lean forward applies it: tables in halves, one Triton kernel on a GPU."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

# (device, head size, dtype, output dtype) where the kernel passed its check but a launch failed (a variant Triton
# could not build for another layout, say): PyTorch's ops rotate there for the rest of the process.
FAILED: set[tuple[torch.device, int, torch.dtype, torch.dtype]] = set()


def empty_like_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor of x's shape whose dimensions lie in memory in x's order (outermost first), even
    where x is not dense: a query or key rotated out of a packed projection keeps that projection's layout, which is
    the layout attention kernels take and give back without a copy."""
    order = sorted(range(x.dim()), key=lambda dim: -x.stride(dim))
    out = torch.empty([x.shape[dim] for dim in order], dtype=dtype, device=x.device)
    return out.permute([order.index(dim) for dim in range(x.dim())])


class Rotary(NamedTuple):
    """A rotary table split in halves, built once per forward: `x * cos + rotate_half(x) * sin` is, half by half,
    (x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2); the first half of sin is kept negated."""

    cos_first: torch.Tensor
    cos_second: torch.Tensor
    sin_first: torch.Tensor  # -sin1
    sin_second: torch.Tensor

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> Rotary:
        firsts, seconds = torch.stack((cos, -sin, sin)).chunk(2, dim=-1)  # four views of one layout
        return cls(firsts[0], seconds[0], firsts[1], seconds[2])


def rotate(x: torch.Tensor, rotary: Rotary, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotary embedding as transformers applies it (`x * cos + rotate_half(x) * sin`), computed in the tables'
    dtype, returned in `dtype` (x's when not given) and laid out as x is.

    Each half of the result is that half of x times cos plus the other half times sin (`Rotary`), read where x lies
    and written into one output. Rotating the whole vector (a float32 copy of x, products, a roll, a sum, a cast
    back) moved 3.4x the bytes in the vision tower, its largest elementwise cost. On a GPU with Triton, float32
    tables (the vision tower's) take one kernel (`kernels.fused_rotate`: 4 bytes per element); elsewhere PyTorch's
    ops (`rotate_with_ops`: 14). Compiled, the halves are plain expressions (dynamo takes no `out=` slice; inductor
    fuses them).
    """
    dtype = dtype or x.dtype
    if torch.compiler.is_compiling():
        first, second = x.chunk(2, dim=-1)
        cos1, cos2, sin1, sin2 = rotary
        return torch.cat((first * cos1 + second * sin1, second * cos2 + first * sin2), dim=-1).to(dtype)
    if fused_applies(x, rotary, dtype):
        out = empty_like_layout(x, dtype)
        if rotate_fused(x, rotary, out):
            return out
    return rotate_with_ops(x, rotary, dtype)


def fused_applies(x: torch.Tensor, rotary: Rotary, dtype: torch.dtype) -> bool:
    """Whether `rotate` tries the Triton kernel: x on a GPU, float32 tables, and the kernel checked there."""
    return x.is_cuda and rotary.cos_first.dtype == torch.float32 and kernel_runs(x.device, x.shape[-1], x.dtype, dtype)


def rotate_fused(x: torch.Tensor, rotary: Rotary, out: torch.Tensor) -> bool:
    """`kernels.fused_rotate`, where a failure (a variant Triton cannot build for another layout, say) is not the
    batch's: it says False, and PyTorch's ops rotate this (device, head size, dtypes) from then on."""
    from annotator import kernels

    try:
        return kernels.fused_rotate(x, rotary, out)
    except Exception as error:  # noqa: BLE001 (whatever failed, PyTorch's ops can do it)
        FAILED.add((x.device, x.shape[-1], x.dtype, out.dtype))
        log.warning("The Triton rotary kernel failed (%s): PyTorch's ops rotate from now on.", error)
        return False


def rotate_with_ops(x: torch.Tensor, rotary: Rotary, dtype: torch.dtype) -> torch.Tensor:
    """`rotate` with PyTorch's ops. float32 tables take a product and a multiply-add that casts as it stores on a
    GPU: one float32 rounding less than transformers' (~1e-7 relative). 16-bit tables (the decoder's in a bfloat16
    model) take transformers' operations exactly, two products then their sum, since there one rounding less
    shows."""
    first, second = x.chunk(2, dim=-1)
    out = empty_like_layout(x, dtype)
    out_first, out_second = out.chunk(2, dim=-1)
    if torch.finfo(rotary.cos_first.dtype).bits < 32:
        torch.add(first * rotary.cos_first, second * rotary.sin_first, out=out_first)
        torch.add(second * rotary.cos_second, first * rotary.sin_second, out=out_second)
    else:
        torch.addcmul(first * rotary.cos_first, second, rotary.sin_first, out=out_first)
        torch.addcmul(second * rotary.cos_second, first, rotary.sin_second, out=out_second)
    return out


def kernel_runs(device: torch.device, head_dim: int, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether `kernels.fused_rotate` runs on this device for this head size and these dtypes: Triton installed,
    and the kernel built and checked against PyTorch's ops (`kernels.usable`), once per process. The scorer asks at
    load (`prepare_kernels`), so that the build and the check's sync do not fall in a batch."""
    if device.type != "cuda":
        return False
    if device.index is None:  # "cuda" is the current GPU; tensors name theirs ("cuda:0"): one answer for both
        if not torch.cuda.is_available():
            return False
        device = torch.device("cuda", torch.cuda.current_device())
    return (device, head_dim, dtype, out_dtype) not in FAILED and kernel_checked(device, head_dim, dtype, out_dtype)


@lru_cache(maxsize=32)
def kernel_checked(device: torch.device, head_dim: int, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """`kernel_runs` for a GPU named with its index, remembered."""
    try:
        from annotator import kernels
    except Exception as error:  # noqa: BLE001 (no Triton, or one that fails as it imports: PyTorch's ops rotate)
        if not isinstance(error, ImportError):
            log.warning("Triton fails to import (%s): PyTorch's ops rotate.", error)
        return False
    return kernels.usable(device, head_dim, dtype, out_dtype)


def prepare_kernels(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Build and check, at load, the rotary kernels the eager lean forward will launch on a GPU: the vision tower's
    head size in the model's dtype, and the decoder's where its tables are float32 (a float32 model)."""
    if device.type != "cuda":
        return
    kernel_runs(device, model.model.visual.blocks[0].attn.head_dim, dtype, dtype)
    if dtype == torch.float32:
        kernel_runs(device, model.model.language_model.layers[0].self_attn.head_dim, dtype, dtype)
