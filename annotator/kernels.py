"""Triton kernels for the eager lean forward on a GPU: the vision tower's rotary embedding in one pass.

Imported only where Triton is installed (`rotary.kernel_runs`); elsewhere the forward uses PyTorch's ops.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from annotator.rotary import Rotary

log = logging.getLogger(__name__)

LEADING_DIMS = 4  # dimensions before the head dimension the kernel walks (the vision tower's q and k have 4)
BLOCK_ROWS = 32  # head vectors per program


@triton.jit(do_not_specialize=["rows", "size1", "size2", "size3"])  # vary with the batch: no recompile for them
def rotary_halves(
    x,
    out,
    cos_first,
    cos_second,
    sin_first,
    sin_second,
    rows,
    size1,
    size2,
    size3,
    x_stride0,
    x_stride1,
    x_stride2,
    x_stride3,
    out_stride0,
    out_stride1,
    out_stride2,
    out_stride3,
    table_stride0,
    table_stride1,
    table_stride2,
    table_stride3,
    HALF: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotary embedding of `BLOCK_ROWS` head vectors: each half read once, computed in float32 (the tables'
    dtype), written once in out's dtype. A row is an index over 4 leading dimensions (sizes -, size1, size2, size3,
    the last varying fastest), with x's, out's and the tables' own strides there (the four tables share theirs; 0
    where a table is broadcast)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    index3 = row % size3
    rest = row // size3
    index2 = rest % size2
    rest = rest // size2
    index1 = rest % size1
    index0 = rest // size1
    x_at = (index0 * x_stride0 + index1 * x_stride1 + index2 * x_stride2 + index3 * x_stride3)[:, None]
    out_at = (index0 * out_stride0 + index1 * out_stride1 + index2 * out_stride2 + index3 * out_stride3)[:, None]
    table_at = (index0 * table_stride0 + index1 * table_stride1 + index2 * table_stride2 + index3 * table_stride3)[
        :, None
    ]
    column = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (row < rows)[:, None] & (column < HALF)
    first = tl.load(x + x_at + column, mask=mask).to(tl.float32)
    second = tl.load(x + x_at + HALF + column, mask=mask).to(tl.float32)
    cos1 = tl.load(cos_first + table_at + column, mask=mask)
    cos2 = tl.load(cos_second + table_at + column, mask=mask)
    sin1 = tl.load(sin_first + table_at + column, mask=mask)
    sin2 = tl.load(sin_second + table_at + column, mask=mask)
    tl.store(out + out_at + column, (first * cos1 + second * sin1).to(out.dtype.element_ty), mask=mask)
    tl.store(out + out_at + HALF + column, (second * cos2 + first * sin2).to(out.dtype.element_ty), mask=mask)


def rotary_kernel(interpret: bool = False) -> Any:
    """The kernel compiled for the GPU, or run by Triton's interpreter on CPU tensors (how tests check it on a
    machine with no GPU)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(rotary_halves.fn)
    return rotary_halves


def fused_rotate(x: torch.Tensor, rotary: Rotary, out: torch.Tensor, interpret: bool = False) -> bool:
    """`rotary.rotate` in one kernel, into `out`: True where it ran, False where it does not apply (then nothing is
    written; the caller computes it with PyTorch's ops).

    It applies to float32 tables (the vision tower's) of one shape and layout, contiguous in the head dimension and
    broadcasting to x; to an x and an out of one shape and device, contiguous in an even, non-empty head dimension,
    with at most `LEADING_DIMS` dimensions before it, out broadcast along none of them; and not where autograd
    would record x's use. One pass reads x's halves and writes out's: 4 bytes per element (bfloat16) where
    PyTorch's product and multiply-add move 14, through a slower mixed-dtype path.
    """
    if x.dim() == 0:
        return False
    tables = tuple(rotary)
    half = x.shape[-1] // 2
    layout = (tables[0].shape, tables[0].stride())
    if (
        half == 0
        or x.shape[-1] != 2 * half
        or x.dim() - 1 > LEADING_DIMS
        or out.shape != x.shape
        or out.device != x.device
        or x.stride(-1) != 1
        or out.stride(-1) != 1
        or any(size > 1 and stride == 0 for size, stride in zip(out.shape, out.stride(), strict=True))
        or (x.requires_grad and torch.is_grad_enabled())
        or tables[0].stride(-1) != 1
        or tables[0].shape[-1] != half
        or any((t.dtype, t.device, t.shape, t.stride()) != (torch.float32, x.device, *layout) for t in tables)
    ):
        return False
    try:
        table_strides = tables[0].expand(*x.shape[:-1], half).stride()[:-1]
    except RuntimeError:  # tables that do not broadcast to x
        return False
    # Rows in memory order (largest stride first), padded with unit dimensions in front.
    order = sorted(range(x.dim() - 1), key=lambda dim: -x.stride(dim))
    pad = LEADING_DIMS - len(order)
    sizes = [1] * pad + [x.shape[dim] for dim in order]
    strides = [[0] * pad + [tensor_strides[dim] for dim in order] for tensor_strides in (x.stride(), out.stride())]
    strides.append([0] * pad + [table_strides[dim] for dim in order])
    rows = x.numel() // x.shape[-1]
    if rows == 0:
        return True
    launch = rotary_kernel(interpret)[(triton.cdiv(rows, BLOCK_ROWS),)]
    arguments = (x, out, *tables, rows, *sizes[1:], *strides[0], *strides[1], *strides[2])
    constants = {"HALF": half, "BLOCK_ROWS": BLOCK_ROWS, "BLOCK_HALF": triton.next_power_of_2(half)}
    if x.is_cuda:  # Triton launches on the current device's current stream: x's
        with torch.cuda.device(x.device):
            launch(*arguments, **constants)
    else:
        launch(*arguments, **constants)
    return True


def usable(device: torch.device, head_dim: int, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether the kernel runs on this GPU for this head size and these dtypes and equals PyTorch's ops there:
    checked on q and k laid out as the vision tower's projection gives them (so the check builds the variant a
    forward launches), so that a machine where Triton cannot build (no C compiler, an old GPU) keeps PyTorch's ops.
    """
    from annotator.rotary import Rotary, empty_like_layout, rotate_with_ops

    try:
        generator = torch.Generator().manual_seed(0)
        images, length, heads = 2, 5, 2
        qkv = torch.randn(images, length, 3, heads, head_dim, generator=generator).to(device, dtype)
        x = qkv.permute(2, 0, 3, 1, 4)[:2]
        angles = torch.randn(1, 1, length, head_dim, generator=generator).to(device)
        rotary = Rotary.of(angles.cos(), angles.sin())
        out = empty_like_layout(x, out_dtype)
        if not fused_rotate(x, rotary, out):
            return False
        expected = rotate_with_ops(x, rotary, out_dtype)
        close = torch.allclose(out.float(), expected.float(), rtol=2**-7, atol=1e-6)
    except Exception as error:  # noqa: BLE001 (any failure to build or run means PyTorch's ops)
        log.warning("The Triton rotary kernel does not run on %s (%s): PyTorch's ops rotate instead.", device, error)
        return False
    if not close:
        log.warning("The Triton rotary kernel differs from PyTorch's ops on %s: PyTorch's ops rotate instead.", device)
    return close
