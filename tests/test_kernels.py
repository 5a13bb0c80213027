"""The Triton rotary kernel (annotator/kernels.py): on a CPU through Triton's interpreter, on a GPU compiled."""

import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

from annotator import rotary

triton = pytest.importorskip("triton", reason="Triton is not installed")
from annotator import kernels  # noqa: E402 (needs Triton)

ON_GPU = torch.cuda.is_available()


def transformers_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary in float32, before the cast back (`apply_rotary_pos_emb_vision`'s operations)."""
    return x.float() * cos + rotate_half(x.float()) * sin


def truncated(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 to bfloat16 by dropping the low bits: how Triton's interpreter casts (a GPU rounds to nearest)."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    return (x.view(torch.int32) & -65536).view(torch.float32).to(dtype)


def vision_case(frames: int, dtype: torch.dtype, device: str = "cpu"):
    """q and k as the vision tower rotates them: views into a packed projection (images, length, 3, heads, dim),
    with a table per frame or one for all (frames 1)."""
    generator = torch.Generator().manual_seed(frames)
    images, length, heads, dim = 3, 7, 2, 10
    qkv = torch.randn(images, length, 3, heads, dim, generator=generator).to(device, dtype)
    x = qkv.permute(2, 0, 3, 1, 4)[:2]
    angles = torch.randn(frames, 1, length, dim // 2, generator=generator).to(device)
    angles = torch.cat((angles, angles), dim=-1)  # the vision tower's table: its halves are equal
    return x, angles.cos(), angles.sin()


def decoder_case(dtype: torch.dtype, device: str = "cpu"):
    """A decoder layer's query (rows, heads, length, dim) transposed from the projection, one table per row."""
    generator = torch.Generator().manual_seed(7)
    rows, length, heads, dim = 2, 5, 3, 8
    x = torch.randn(rows, length, heads, dim, generator=generator).to(device, dtype).transpose(1, 2)
    angles = torch.randn(rows, 1, length, dim, generator=generator).to(device)
    return x, angles.cos(), angles.sin()


def dense_case(dtype: torch.dtype, device: str = "cpu"):
    """A dense x (rows, length, dim) with a table for every position: the table varies along every dimension."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(3, 9, 6, generator=generator).to(device, dtype)
    angles = torch.randn(3, 9, 6, generator=generator).to(device)
    return x, angles.cos(), angles.sin()


CASES = [
    pytest.param(lambda dtype: vision_case(1, dtype), id="vision-one-table"),
    pytest.param(lambda dtype: vision_case(3, dtype), id="vision-table-per-image"),
    pytest.param(decoder_case, id="decoder"),
    pytest.param(dense_case, id="dense"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_kernel_computes_transformers_rotary(case, dtype):
    """Every element is transformers' float32 value cast to the output dtype (the interpreter's bfloat16 cast
    truncates, so that is what it is compared with), written where the output's layout puts it."""
    x, cos, sin = case(dtype)
    out = rotary.empty_like_layout(x, dtype)
    assert kernels.fused_rotate(x, rotary.Rotary.of(cos, sin), out, interpret=True)
    torch.testing.assert_close(out, truncated(transformers_rotary(x, cos, sin), dtype), atol=0, rtol=0)


def test_the_kernel_writes_another_dtype_and_nothing_else():
    """bfloat16 in, float32 out (`rotate`'s dtype argument); the output's other elements untouched."""
    x, cos, sin = vision_case(1, torch.bfloat16)
    canvas = torch.full((2, 3, 2, 7, 12), -7.0)
    out = canvas[..., 1:11]
    assert kernels.fused_rotate(x, rotary.Rotary.of(cos, sin), out, interpret=True)
    torch.testing.assert_close(out, transformers_rotary(x, cos, sin), atol=0, rtol=0)
    assert (canvas[..., 0] == -7).all() and (canvas[..., 11] == -7).all()


def declined(x: torch.Tensor, halves: rotary.Rotary, out: torch.Tensor) -> bool:
    """The kernel said it does not apply, and wrote nothing."""
    before = out.clone()
    return not kernels.fused_rotate(x, halves, out, interpret=True) and torch.equal(out, before)


def test_the_kernel_declines_what_it_does_not_handle():
    """Where it does not apply it writes nothing and says so: `rotate` then uses PyTorch's ops."""
    x, cos, sin = vision_case(1, torch.float32)
    halves = rotary.Rotary.of(cos, sin)
    out = torch.full_like(x, 3.0)
    assert declined(x, rotary.Rotary.of(cos.bfloat16(), sin.bfloat16()), out)  # the decoder's tables in bfloat16
    assert declined(torch.randn(2, 3, 2, 7, 20)[..., ::2], halves, out)  # the head dimension not contiguous
    assert declined(x[..., :9], halves, out[..., :9])  # an odd head dimension
    assert declined(x[None], halves, out[None])  # five leading dimensions
    assert declined(x, rotary.Rotary(halves.cos_first.contiguous(), *halves[1:]), out)  # tables of two layouts
    assert declined(x, rotary.Rotary.of(cos[:, :, :3], sin[:, :, :3]), out)  # tables that do not broadcast to x
    # Found by a review: each of these was written, wrongly.
    assert declined(x, halves, torch.full((2, 3, 2, 7, 10 + 10), 3.0)[..., :10].flatten(0, 1))  # out of fewer dims
    canvas = torch.full((40, 10), 3.0)
    assert declined(torch.randn(4, 10), rotary.Rotary.of(*torch.randn(2, 4, 10)), canvas[:2])  # a smaller out
    assert declined(torch.randn(4, 10), rotary.Rotary.of(*torch.randn(2, 4, 10)), torch.zeros(1, 10).expand(4, 10))
    strided_table = torch.randn(10, 7).t()  # (7, 10), its head dimension 7 apart
    strided = rotary.Rotary(strided_table[:, :5], strided_table[:, 5:], -strided_table[:, :5], strided_table[:, 5:])
    assert declined(torch.randn(7, 10), strided, torch.zeros(7, 10))
    cos_one, sin_three = torch.randn(1, 7, 10), torch.randn(3, 7, 10)
    assert declined(torch.randn(3, 7, 10), rotary.Rotary(*cos_one.chunk(2, -1), *sin_three.chunk(2, -1)), x[0, :, 0])
    assert declined(torch.randn(2, 0), rotary.Rotary.of(*torch.randn(2, 2, 0)), torch.zeros(2, 0))  # no head dim
    one_wide = rotary.Rotary.of(*torch.randn(2, 7, 2))  # head-size-1 halves, which would broadcast
    assert declined(torch.randn(7, 10), one_wide, torch.zeros(7, 10))
    x2, table = torch.randn(7, 10), rotary.Rotary.of(*torch.randn(2, 7, 10))
    assert declined(x2, table, torch.zeros(7, 20)[:, ::2])  # out's head dimension not contiguous
    assert not kernels.fused_rotate(x2, table, torch.zeros(7, 10, device="meta"), interpret=True)  # another device
    assert not kernels.fused_rotate(torch.tensor(1.0), table, torch.tensor(0.0), interpret=True)  # no dimension
    needs_grad = x.clone().requires_grad_()
    assert declined(needs_grad, halves, out)  # autograd would not see the kernel
    with torch.no_grad():
        assert kernels.fused_rotate(needs_grad, halves, torch.empty_like(x), interpret=True)
    empty = x[:, :0]
    assert kernels.fused_rotate(empty, halves, torch.empty_like(empty), interpret=True)


def test_a_kernel_that_fails_in_a_batch_leaves_that_variant_to_pytorch(monkeypatch, caplog):
    """A launch that raises after the check passed (a layout whose variant Triton cannot build, say) is not the
    batch's error: `rotate` gives PyTorch's result, warns, and does not try that variant again."""
    monkeypatch.setattr(rotary, "FAILED", set())
    monkeypatch.setattr(rotary, "fused_applies", lambda *_: True)  # as on a GPU where the check passed
    launches = []

    def fails(*args, **kwargs):
        launches.append(args)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(kernels, "fused_rotate", fails)
    x, cos, sin = vision_case(1, torch.bfloat16)
    halves = rotary.Rotary.of(cos, sin)
    torch.testing.assert_close(rotary.rotate(x, halves), rotary.rotate_with_ops(x, halves, x.dtype), atol=0, rtol=0)
    assert len(launches) == 1 and "PassManager::run failed" in caplog.text
    assert {(x.device, x.shape[-1], x.dtype, x.dtype)} == rotary.FAILED
    gpu = torch.device("cuda", 0)
    rotary.FAILED.add((gpu, 10, torch.bfloat16, torch.bfloat16))
    assert not rotary.kernel_runs(gpu, 10, torch.bfloat16, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_on_a_gpu_uses_the_kernel_and_equals_transformers(dtype):
    """On a GPU `rotary.rotate` runs the compiled kernel (built and checked once per head size and dtype), and its
    output is transformers' rounded to nearest: in float32 within float32 rounding (a fused multiply-add), in
    bfloat16 within one unit in the last place, nearly always equal."""
    for case in (lambda *a: vision_case(1, *a), lambda *a: vision_case(3, *a), decoder_case, dense_case):
        x, cos, sin = case(dtype, "cuda")
        assert rotary.kernel_runs(x.device, x.shape[-1], dtype, dtype)
        halves = rotary.Rotary.of(cos, sin)
        fused = rotary.empty_like_layout(x, dtype)
        assert kernels.fused_rotate(x, halves, fused)
        assert torch.equal(rotary.rotate(x, halves), fused)
        expected = transformers_rotary(x, cos, sin)
        if dtype == torch.float32:
            torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-6)
        else:
            torch.testing.assert_close(fused.float(), expected, atol=0, rtol=2**-7)
            assert (fused != expected.to(dtype)).float().mean() < 0.02
        torch.testing.assert_close(fused, rotary.rotate_with_ops(x, halves, dtype))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_the_kernel_runs_on_the_device_of_its_tensors():
    """Triton launches on the current device: the kernel makes it x's, so a writer on cuda:1 rotates there."""
    x, cos, sin = vision_case(3, torch.bfloat16, "cuda:1")
    assert torch.cuda.current_device() == 0
    assert rotary.kernel_runs(x.device, x.shape[-1], x.dtype, x.dtype)
    rotated = rotary.rotate(x, rotary.Rotary.of(cos, sin))
    torch.testing.assert_close(rotated.float(), transformers_rotary(x, cos, sin), atol=0, rtol=2**-7)
