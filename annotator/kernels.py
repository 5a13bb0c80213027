"""Triton kernels for the eager lean forward on a GPU: the vision tower's rotary embedding in one pass.

Imported only where Triton is installed (`forward.rotary_kernel_runs`); the forward falls back to PyTorch's ops.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from annotator.forward import Rotary

log = logging.getLogger(__name__)

LEADING_DIMS = 4  # dimensions before the head dimension the kernel walks (the vision tower's q and k have 4)
BLOCK_ROWS = 32  # head vectors per program


@triton.jit(do_not_specialize=["rows", "size1", "size2", "size3"])  # vary with the batch: no recompile for them
def rotary_halves(x, out, cos1, cos2, sin1, sin2, rows, size1, size2, size3, x0, x1, x2, x3, o0, o1, o2, o3, t0, t1, t2, t3, HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip  # noqa: E501, N803
    """Rotary embedding of `BLOCK_ROWS` head vectors: each half read once, computed in float32 (the tables'
    dtype), written once in out's dtype. A row is an index over up to 4 leading dimensions (sizes ?, size1, size2,
    size3, the last varying fastest), with x's, out's and the tables' own strides there (the four tables share
    theirs; 0 where a table is broadcast).
    """
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    i3 = row % size3
    rest = row // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    x_at = (i0 * x0 + i1 * x1 + i2 * x2 + i3 * x3)[:, None]
    out_at = (i0 * o0 + i1 * o1 + i2 * o2 + i3 * o3)[:, None]
    table_at = (i0 * t0 + i1 * t1 + i2 * t2 + i3 * t3)[:, None]
    column = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (row < rows)[:, None] & (column < HALF)
    first = tl.load(x + x_at + column, mask=mask).to(tl.float32)
    second = tl.load(x + x_at + HALF + column, mask=mask).to(tl.float32)
    rotated_first = first * tl.load(cos1 + table_at + column, mask=mask) + second * tl.load(
        sin1 + table_at + column, mask=mask
    )
    rotated_second = second * tl.load(cos2 + table_at + column, mask=mask) + first * tl.load(
        sin2 + table_at + column, mask=mask
    )
    tl.store(out + out_at + column, rotated_first.to(out.dtype.element_ty), mask=mask)
    tl.store(out + out_at + HALF + column, rotated_second.to(out.dtype.element_ty), mask=mask)


def rotary_kernel(interpret: bool = False) -> Any:
    """The kernel compiled for the GPU, or run by Triton's interpreter on CPU tensors (how tests check it on a
    machine with no GPU)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(rotary_halves.fn)
    return rotary_halves


def fused_rotate(x: torch.Tensor, rotary: Rotary, out: torch.Tensor, interpret: bool = False) -> bool:
    """`forward.rotate` in one kernel, into `out` (x's shape): True where it ran, False where it does not apply
    (then nothing is written; the caller computes it with PyTorch's ops).

    It applies to float32 tables (the vision tower's) sharing one layout, and to an x and out whose head dimension
    is contiguous with at most `LEADING_DIMS` dimensions before it. One pass reads x's bf16 halves and writes out's:
    4 bytes per element where PyTorch's product and multiply-add move 14, through a slower mixed-dtype path.
    """
    tables = tuple(rotary)
    half = x.shape[-1] // 2
    if (
        x.dim() - 1 > LEADING_DIMS
        or x.shape[-1] != 2 * half
        or x.stride(-1) != 1
        or out.stride(-1) != 1
        or any(t.dtype != torch.float32 or t.stride() != tables[0].stride() or t.shape[-1] != half for t in tables)
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
    kernel = rotary_kernel(interpret)
    kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        x, out, *tables, rows, *sizes[1:], *strides[0], *strides[1], *strides[2],
        HALF=half, BLOCK_ROWS=BLOCK_ROWS, BLOCK_HALF=triton.next_power_of_2(half),
    )  # fmt: skip
    return True


@lru_cache(maxsize=8)
def usable(device: torch.device) -> bool:
    """Whether the kernel runs on this GPU and equals PyTorch's ops there: checked once per device on a small
    problem, so that a machine where Triton cannot build (no C compiler, an old GPU) keeps PyTorch's ops."""
    if device.type != "cuda":
        return False
    from annotator.forward import Rotary, rotate_with_ops

    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 5, 8, generator=generator).to(device, torch.bfloat16)
        angles = torch.randn(1, 1, 5, 8, generator=generator).to(device)
        rotary = Rotary.of(angles.cos(), angles.sin())
        out = torch.empty_like(x)
        if not fused_rotate(x, rotary, out):
            return False
        expected = rotate_with_ops(x, rotary, torch.bfloat16)
        close = torch.allclose(out.float(), expected.float(), rtol=2**-7, atol=1e-6)
    except Exception as error:  # noqa: BLE001 (any failure to build or run means PyTorch's ops)
        log.warning("the Triton rotary kernel does not run here (%s); the vision rotary uses PyTorch's ops", error)
        return False
    if not close:
        log.warning("the Triton rotary kernel differs from PyTorch's ops here; using PyTorch's ops")
    return close
