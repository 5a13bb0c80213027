"""The lean forward: Qwen2-VL's own modules and weights, run with no host sync and no per-image loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.nn.functional import rms_norm, scaled_dot_product_attention, silu
from transformers.activations import QuickGELUActivation
from transformers.models.qwen2_vl.modeling_qwen2_vl import repeat_kv

from annotator.batching import MERGE_SIZE
from annotator.rotary import Rotary, rotate

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: (key, value), (batch, kv heads, length, dim)


@lru_cache(maxsize=256)
def grid_rotary_positions(height: int, width: int) -> torch.Tensor:
    """(row, column) of each patch of one frame, in the merge-group order the patches arrive in: (h * w, 2).

    The vision tower's rotary position ids, as transformers' `get_vision_position_ids` builds them; cached per
    grid so a batch only concatenates them.
    """
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    shape = (height // MERGE_SIZE, MERGE_SIZE, width // MERGE_SIZE, MERGE_SIZE)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).ravel()
    columns = columns.reshape(shape).transpose(0, 2, 1, 3).ravel()
    return torch.from_numpy(np.stack([rows, columns], axis=1).astype(np.int64))


@dataclass(frozen=True, slots=True)
class VisionLayout:
    """How a batch's packed patches are laid out for attention, computed on the host from the grids alone.

    Each frame of each image attends only to itself. Frames of one length (one grid, or grids of one area such as
    30x48 and 48x30, a landscape and a portrait photo) are viewed as (frames, heads, length, dim) with no copy,
    each with its own rotary positions; frames of several lengths are gathered into that shape, padded to the
    longest, with an additive mask on the padded keys, and scattered back: one attention call per block either way.
    """

    frames: int
    length: int
    positions: torch.Tensor  # (length, 2) shared by every frame of one grid, else (frames * length, 2)
    gather: torch.Tensor | None = None  # (frames * length,) packed patch behind each padded slot
    scatter: torch.Tensor | None = None  # (patches,) padded slot of each packed patch
    key_mask: torch.Tensor | None = None  # (frames, 1, 1, length) additive: 0 on patches, -inf on padding

    @classmethod
    def build(cls, grids: Sequence[Sequence[int]], dtype: torch.dtype) -> VisionLayout:
        sizes = [(int(h), int(w)) for t, h, w in grids for _ in range(int(t))]
        if len(set(sizes)) == 1:
            return cls(len(sizes), sizes[0][0] * sizes[0][1], grid_rotary_positions(*sizes[0]))
        lengths = np.array([h * w for h, w in sizes])
        if len(set(lengths.tolist())) == 1:  # no padding needed: only the positions differ
            positions = torch.cat([grid_rotary_positions(h, w) for h, w in sizes])
            return cls(len(sizes), int(lengths[0]), positions)
        length = int(lengths.max())
        slot = np.arange(length)
        valid = slot[None, :] < lengths[:, None]  # (frames, length)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        gather = torch.from_numpy(np.where(valid, starts[:, None] + slot[None, :], 0).ravel())
        scatter = torch.from_numpy((np.arange(len(sizes))[:, None] * length + slot[None, :])[valid])
        packed = torch.cat([grid_rotary_positions(h, w) for h, w in sizes])
        positions = torch.zeros((len(sizes) * length, 2), dtype=torch.int64).index_copy_(0, scatter, packed)
        key_mask = torch.zeros(valid.shape, dtype=dtype).masked_fill_(torch.from_numpy(~valid), float("-inf"))
        return cls(len(sizes), length, positions, gather, scatter, key_mask[:, None, None, :])

    def to(self, device: torch.device, pin: bool = False) -> VisionLayout:
        """The same layout on `device` (non-blocking copies, from pinned memory when `pin`)."""

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            return (tensor.pin_memory() if pin else tensor).to(device, non_blocking=True)

        return VisionLayout(
            self.frames,
            self.length,
            move(self.positions),
            move(self.gather),
            move(self.scatter),
            move(self.key_mask),
        )


def image_token_index(placements: Sequence[tuple[int, int, int]], length: int) -> np.ndarray:
    """Flat positions in a (rows, length) batch of the image tokens of each (row, first position, count), in turn.

    Where the vision tower's merged patches go, image after image in the order the tower saw them.
    """
    return np.concatenate([row * length + start + np.arange(count) for row, start, count in placements])


QUICK_GELU = 1.702  # QuickGELU(h) = h * sigmoid(1.702 h)


def vision_mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A vision block's MLP, `fc2(QuickGELU(fc1(x)))`, with QuickGELU as one SiLU kernel instead of three passes.

    h * sigmoid(1.702 h) is silu(1.702 h) / 1.702: fc1 computes 1.702 h (its product scaled by alpha, its bias
    scaled beforehand: a small kernel per block; both in the matrix product's epilogue on a GPU), and fc2 scales its
    product by 1 / 1.702. Equal to transformers' up to rounding: ~1e-7 relative in float32; in bfloat16 an
    activation rounds once where transformers rounds it three times. float16 runs the module: 1.702 h would
    overflow where h lies above 38,486, which transformers' form survives. So do other activations.
    """
    if not isinstance(getattr(mlp, "act", None), QuickGELUActivation) or x.dim() != 2 or x.dtype == torch.float16:
        return mlp(x)
    fc1, fc2 = mlp.fc1, mlp.fc2
    if fc1.bias is None or fc2.bias is None:
        return mlp(x)
    scaled = torch.addmm(fc1.bias * QUICK_GELU, x, fc1.weight.t(), alpha=QUICK_GELU)
    return torch.addmm(fc2.bias, silu(scaled, inplace=True), fc2.weight.t(), alpha=1 / QUICK_GELU)


def rms_normed(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen2-VL's RMSNorm with PyTorch's kernel: normalized in float32, cast to x's dtype, then times the weight,
    as transformers rounds. On a CPU bit for bit (PyTorch decomposes it as transformers writes it); on a GPU one
    fused kernel (its sum in another order) where transformers' form makes seven passes. Other norms run as is."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        return norm(x)
    return norm.weight * rms_norm(x, (x.shape[-1],), None, eps)


def vision_features(
    visual: torch.nn.Module, pixel_values: torch.Tensor, layout: VisionLayout, regions: Regions | None = None
) -> torch.Tensor:
    """The vision tower on a batch of packed patches: merged image tokens (patches / 4, hidden), in patch order."""
    regions = regions or EAGER
    hidden = patch_embedded(visual.patch_embed, pixel_values)
    rotary = vision_rotary(visual, hidden, layout)
    with regions.settings():
        for block in visual.blocks:
            hidden = regions.vision_block(block, hidden, rotary, layout.gather, layout.scatter, layout.key_mask)
    return visual.merger(hidden)


def patch_embedded(patch_embed: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch embedding, on a GPU as one matrix product (`patch_product`). cuDNN ran its convolution through a
    generic kernel: 10.9 ms per batch of 64 seed-sized images on an H100 (2026-11-26), where the product's 0.28
    TFLOP took 0.43 ms. A CPU runs the module: there the convolution is no slower, and it keeps transformers'
    roundings (the product is closer to float64, 1.5e-5 against 6.3e-5 on the tiny model's outputs of ~50, which
    would move the lean forward that far from transformers')."""
    if pixel_values.is_cuda and is_patch_product(patch_embed, pixel_values):
        return patch_product(patch_embed.proj, pixel_values)
    return patch_embed(pixel_values)


def is_patch_product(patch_embed: torch.nn.Module, pixel_values: torch.Tensor) -> bool:
    """Whether the patch embedding is a matrix product: a 3-D convolution without bias whose kernel is a patch and
    whose stride is as long (Qwen2-VL's), so that each output is the patch's flattened pixels times the flattened
    kernel, on rows of exactly one patch."""
    conv = getattr(patch_embed, "proj", None)
    return (
        isinstance(conv, torch.nn.Conv3d)
        and conv.bias is None
        and conv.kernel_size == conv.stride
        and conv.padding == (0, 0, 0)
        and conv.dilation == (1, 1, 1)
        and conv.groups == 1
        and pixel_values.shape[-1] == conv.weight[0].numel()
    )


def patch_product(conv: torch.nn.Conv3d, pixel_values: torch.Tensor) -> torch.Tensor:
    """A patch-sized, patch-strided convolution without bias as a matrix product: (patches, out channels)."""
    weight = conv.weight.view(conv.out_channels, -1)
    return torch.matmul(pixel_values.view(-1, weight.shape[1]).to(weight.dtype), weight.t())


def vision_rotary(visual: torch.nn.Module, hidden: torch.Tensor, layout: VisionLayout) -> Rotary:
    """The vision tower's rotary table for a batch, shaped (frames or 1, 1, length, head dim) for all heads."""
    length = layout.length
    cos, sin = visual.rotary_pos_emb(hidden, layout.positions)  # (length or frames * length, head dim)
    return Rotary.of(cos.view(-1, 1, length, cos.shape[-1]), sin.view(-1, 1, length, sin.shape[-1]))


def vision_block(
    block: torch.nn.Module,
    hidden: torch.Tensor,
    rotary: Rotary,
    gather: torch.Tensor | None,
    scatter: torch.Tensor | None,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """One block of the vision tower: every frame's attention in one call (`VisionLayout`), then the MLP.

    Sizes come from the tensors' shapes, never from Python ints, so that a compiled block treats them as dynamic.
    """
    attn = block.attn
    length = rotary.cos_first.shape[2]
    qkv = attn.qkv(block.norm1(hidden))
    if gather is not None:
        qkv = qkv.index_select(0, gather)
    qkv = qkv.view(-1, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    # transformers rotates in float32 (the tables' dtype) whatever the model's dtype, then casts back.
    query, key = rotate(qkv[:2], rotary, qkv.dtype).unbind(0)
    out = scaled_dot_product_attention(query, key, qkv[2], attn_mask=key_mask, scale=attn.scaling)
    out = out.transpose(1, 2).reshape(-1, attn.num_heads * attn.head_dim)
    if scatter is not None:
        out = out.index_select(0, scatter)
    hidden = hidden + attn.proj(out)
    return hidden + vision_mlp(block.mlp, block.norm2(hidden))


def embed(
    text_model: torch.nn.Module, input_ids: torch.Tensor, image_index: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Token embeddings with the image features written at host-computed positions (no count check on the device)."""
    embeds = text_model.embed_tokens(input_ids)
    embeds.view(-1, embeds.shape[-1]).index_copy_(0, image_index, features.to(embeds.dtype))
    return embeds


def rotary_tables(text_model: torch.nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor) -> Rotary:
    """The rotary table of Qwen2-VL's 3-D (temporal, height, width) positions, shaped to broadcast over heads."""
    cos, sin = text_model.rotary_emb(embeds, position_ids)
    return Rotary.of(cos.unsqueeze(1), sin.unsqueeze(1))


def causal_mask(valid: torch.Tensor, dtype: torch.dtype, past: int = 0) -> torch.Tensor:
    """Additive (rows, 1, length, past + length) mask: causal over real tokens; a padding query sees itself only.

    `valid` is (rows, past + length), true on real tokens. A padding row never has every key masked, so no
    kernel can turn it into NaN; real queries never look at padding, so their results are unchanged.
    """
    length = valid.shape[1] - past
    query = torch.arange(past, past + length, device=valid.device)[:, None]
    key = torch.arange(past + length, device=valid.device)[None, :]
    allowed = ((key <= query) & valid[:, None, None, :]) | (key == query)
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill_(~allowed, float("-inf"))


def question_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (rows, 1, length, length) mask of rows holding several questions after one shared prefix.

    `segments` is (rows, length): -1 on padding, 0 on the shared prefix, q on question q's tokens. A token sees the
    real tokens before it in the prefix and in its own question, never another question's, so each question's
    tokens compute exactly what they would after the prefix alone. With one question it is `causal_mask`.
    """
    length = segments.shape[1]
    position = torch.arange(length, device=segments.device)
    query, key = position[:, None], position[None, :]
    keys = segments[:, None, :]
    visible = (keys == 0) | (keys == segments[:, :, None])  # (rows, query, key): the prefix, or the same question
    allowed = ((key <= query) & visible & (keys >= 0)) | (key == query)
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(~allowed, float("-inf"))[
        :, None
    ]


def decode(
    text_model: torch.nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    rotary: Rotary,
    past: KeyValues | None = None,
    keep_key_values: bool = False,
    regions: Regions | None = None,
) -> tuple[torch.Tensor, KeyValues]:
    """The decoder layers over `hidden` (rows, length, width): the hidden states, and with `keep_key_values` each
    layer's keys/values (past ones included) for later tokens to attend to; else none are kept (`use_cache=False`).

    `past` holds keys/values of earlier tokens to attend to (rows, kv heads, past length, dim); `mask` covers
    past + current keys.
    """
    regions = regions or EAGER
    present: KeyValues = []
    with regions.settings():
        for index, layer in enumerate(text_model.layers):
            hidden, key_values = regions.decoder_layer(
                layer, hidden, mask, rotary, None if past is None else past[index]
            )
            if keep_key_values:
                present.append(key_values)
    return hidden, present


def decoder_layer(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    rotary: Rotary,
    past: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One decoder layer: the hidden states, and its keys/values (past ones first) for later tokens to attend to."""
    rows, length, _ = hidden.shape
    attn = layer.self_attn
    x = rms_normed(layer.input_layernorm, hidden)
    query = rotate(attn.q_proj(x).view(rows, length, -1, attn.head_dim).transpose(1, 2), rotary)
    key = rotate(attn.k_proj(x).view(rows, length, -1, attn.head_dim).transpose(1, 2), rotary)
    value = attn.v_proj(x).view(rows, length, -1, attn.head_dim).transpose(1, 2)
    if past is not None:
        key, value = torch.cat((past[0], key), dim=2), torch.cat((past[1], value), dim=2)
    # Key/value heads repeated, as transformers does whenever a mask is given (a masked GQA call would fall back
    # to the slow kernel on a GPU).
    groups = attn.num_key_value_groups
    out = scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=attn.scaling
    )
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(rows, length, -1))
    return hidden + layer.mlp(rms_normed(layer.post_attention_layernorm, hidden)), (key, value)


@dataclass(frozen=True, slots=True)
class Regions:
    """The two pieces the forward repeats (a vision block, a decoder layer), each run eagerly or compiled, and the
    settings they run under (`compiling_settings` when compiled)."""

    vision_block: Callable[..., torch.Tensor]
    decoder_layer: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]
    settings: Callable[[], AbstractContextManager[object]] = nullcontext


EAGER = Regions(vision_block, decoder_layer)

# Compiled variants kept per piece. Each (model, device, dtype) a process scores with adds four vision-block variants
# and two decoder-layer ones; PyTorch's default (8) with fullgraph=True raises at the ninth: a third dtype failed.
RECOMPILE_LIMIT = 64


@contextmanager
def compiling_settings() -> Iterator[None]:
    """What torch.compile must read while it compiles the pieces, set only while they run (no global left changed).

    Sizes that happen to be equal when a variant is compiled (a batch's length and a head's width, say) are not
    assumed equal ever after ("duck" shapes): that would recompile whenever they differ. And each piece keeps up to
    `RECOMPILE_LIMIT` variants, whatever the process's own limit.
    """
    from torch._dynamo import config as dynamo_config
    from torch.fx.experimental import _config as fx_config

    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    with fx_config.patch(use_duck_shape=False), dynamo_config.patch(**{limit: RECOMPILE_LIMIT}):
        yield


@lru_cache(maxsize=1)
def compiled_regions() -> Regions:
    """Both pieces through torch.compile (inductor: Triton kernels on a GPU, C++ on a CPU), which fuses the
    elementwise work between the matrix products (rotary in float32, QuickGELU, residual adds, norms).

    PyTorch's regional compilation: each piece is compiled once and reused by every block or layer (the modules'
    weights are inputs, not constants), so compiling costs one block and one layer, not the whole model. Shapes
    are dynamic, so a new batch shape reuses the compiled code; a handful of variants (one frame or several, one
    grid or several, one row or several) are compiled as they first occur (`Scorer.warm_up` does it at load).
    """
    return Regions(
        torch.compile(vision_block, dynamic=True, fullgraph=True),
        torch.compile(decoder_layer, dynamic=True, fullgraph=True),
        compiling_settings,
    )


def head(model: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at the last position of every row (left padding puts each row's end there): (rows, vocabulary); or
    at the host-computed flat positions `index` of (rows * length): (len(index), vocabulary)."""
    chosen = hidden[:, -1] if index is None else hidden.flatten(0, 1).index_select(0, index)
    return model.lm_head(model.model.language_model.norm(chosen))


@dataclass(slots=True)
class LeanInputs:
    """One batch on the device for the lean forward; built on the host, so nothing here is read back."""

    input_ids: torch.Tensor  # (rows, length), left padded: shared prefix, then each question in turn
    segments: torch.Tensor  # (rows, length): -1 on padding, 0 on the shared prefix, q on question q
    position_ids: torch.Tensor  # (3, rows, length)
    pixel_values: torch.Tensor  # (patches, channels * 2 * 14 * 14), images in `vision` order
    vision: VisionLayout
    image_index: torch.Tensor  # (image tokens,) flat position of each merged patch in the batch, in patch order
    answer_index: torch.Tensor  # (rows * questions,) flat position of each question's last token, row by row


def lean_logits(model: torch.nn.Module, inputs: LeanInputs, regions: Regions | None = None) -> torch.Tensor:
    """Logits (rows * questions, vocabulary) at each question's last token: vision once per image, the shared
    prefix once per row, each question once; embeddings, decoder, head; `use_cache=False`. `regions`: the
    blocks and layers eager (the default) or compiled (`compiled_regions`)."""
    text_model = model.model.language_model
    features = vision_features(model.model.visual, inputs.pixel_values, inputs.vision, regions)
    embeds = embed(text_model, inputs.input_ids, inputs.image_index, features)
    mask = question_mask(inputs.segments, embeds.dtype)
    rotary = rotary_tables(text_model, embeds, inputs.position_ids)
    hidden, _ = decode(text_model, embeds, mask, rotary, regions=regions)
    return head(model, hidden, inputs.answer_index)
