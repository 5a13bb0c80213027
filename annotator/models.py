"""Model loading: a hub id or local folder, the offline `tiny` test model, or a random full-size Qwen2-VL-2B."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotator.errors import AnnotatorError

TINY = "tiny"
RANDOM_2B = "qwen2-vl-2b-random"
TINY_VERSION = "v1"
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, as in Qwen2-VL's preprocessor_config.json
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL-2B-Instruct's architecture (its config.json), for the random-weights benchmark model.
QWEN2_VL_2B_TEXT = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=True,
)
QWEN2_VL_2B_VISION = dict(
    depth=32,
    embed_dim=1280,
    hidden_size=1536,
    mlp_ratio=4,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)


@dataclass
class LoadedModel:
    """What scoring needs: the model, its tokenizer, and the image normalisation it was trained with."""

    model: Any
    tokenizer: Any
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    name: str
    device: Any
    dtype: Any


def cache_dir() -> Path:
    root = os.environ.get("ANNOTATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "annotator"
    )
    return Path(root)


def _tiny_corpus() -> list[str]:
    from annotator.recipe import SEED_QUESTION

    words = (
        "a the cat dog photo of an image picture with on in and red green blue black white small large "
        "man woman person street car sky tree water table cup coffee rocket astronaut space camera grass "
        "brick wall clock text paper galaxy retina is are this that related answer yes no Y N system user "
        "assistant You are a helpful assistant."
    )
    return [SEED_QUESTION, words, "You are a helpful assistant.", "Y N Y N yes no"] * 4


def build_tiny_tokenizer():
    """A small byte-level BPE with every Qwen2-VL special token; "Y" and "N" are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def _qwen2_vl_config(tokenizer, text: dict, vision: dict, initializer_range: float = 0.02):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2VLConfig(
        text_config={
            **text,
            "initializer_range": initializer_range,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={**vision, "initializer_range": initializer_range},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def make_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a small random Qwen2-VL (same classes and layout as the real one) into `directory`."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    # A wide initialisation makes answers depend strongly on the input, so equality tests can fail.
    config = _qwen2_vl_config(tokenizer, text, vision, initializer_range=0.3)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent if directory.parent.exists() else None))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, directory)
    return directory


def _preprocessor_config() -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def tiny_model_dir() -> Path:
    directory = cache_dir() / f"tiny-qwen2-vl-{TINY_VERSION}"
    if not (directory / "config.json").is_file():
        make_tiny_model(directory)
    return directory


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise AnnotatorError(f"`model.device` = {device!r} is not a device: {exc}. Use auto, cpu or cuda.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AnnotatorError("`model.device` asks for cuda, but no GPU is visible. Use `model.device: auto` or cpu.")
    return resolved


def resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _read_image_normalisation(source: str, revision: str | None, local_only: bool) -> tuple[tuple, tuple]:
    if source in (TINY, RANDOM_2B):
        return IMAGE_MEAN, IMAGE_STD
    from transformers.image_processing_base import ImageProcessingMixin

    config, _ = ImageProcessingMixin.get_image_processor_dict(source, revision=revision, local_files_only=local_only)
    return tuple(config.get("image_mean", IMAGE_MEAN)), tuple(config.get("image_std", IMAGE_STD))


def is_hub_model(name: str) -> bool:
    """A model name that is a Hugging Face Hub repository (not `tiny`, the random 2B or a local folder)."""
    from annotator.hub import is_hub_id

    return name not in (TINY, RANDOM_2B) and is_hub_id(name)


def _hub_access(name: str, revision: str | None) -> tuple[bool, str | None]:
    """(cache only?, why) for a model name: a Hub id is read from the cache alone when the Hub cannot be reached.

    Raises `ModelUnavailable` at once (before torch is imported) when the cache does not even hold its config.
    """
    from huggingface_hub import try_to_load_from_cache

    from annotator.hub import ModelUnavailable, unreachable_reason

    if not is_hub_model(name):
        return False, None
    reason = unreachable_reason()
    if reason is not None and not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        raise ModelUnavailable(name, reason)
    return reason is not None, reason


def load_model(
    name: str,
    revision: str | None,
    dtype: str,
    device: str,
    attn_implementation: str,
    progress_bars: str = "none",
) -> LoadedModel:
    """Load the scoring model; a hub id that cannot be fetched is a clear error, never a silent fallback.

    The Hub is probed first (seconds): unreachable, the model comes from the cache or the error says what to
    type. `progress_bars`: `all` (a terminal), `downloads` (the Hub's download bars only: a first run downloads
    about 4.4 GB, and a log should show it) or `none`.
    """
    local_only, unreachable = _hub_access(name, revision)  # before torch is imported: an offline error at once
    import torch
    from huggingface_hub.utils import enable_progress_bars
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own bars (loading weights), and the Hub's with them
    if progress_bars == "all":
        hf_logging.enable_progress_bar()
    if progress_bars in ("all", "downloads"):
        enable_progress_bars()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        if name == RANDOM_2B:
            tokenizer = build_tiny_tokenizer()
            config = _qwen2_vl_config(tokenizer, QWEN2_VL_2B_TEXT, QWEN2_VL_2B_VISION)
            config._attn_implementation = attn_implementation
            with torch.device(torch_device):
                model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch_dtype)
        else:
            source = str(tiny_model_dir()) if name == TINY else name
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, local_files_only=local_only)
            model = Qwen2VLForConditionalGeneration.from_pretrained(
                source,
                revision=revision,
                dtype=torch_dtype,
                attn_implementation=attn_implementation,
                local_files_only=local_only,
            )
        mean, std = _read_image_normalisation(str(tiny_model_dir()) if name == TINY else name, revision, local_only)
    except (OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if unreachable is not None:
            from annotator.hub import ModelUnavailable

            raise ModelUnavailable(name, unreachable) from None
        where = "a local folder" if Path(name).exists() else "the Hugging Face Hub (no such repo, or gated)"
        raise AnnotatorError(
            f"Could not load model {name!r} from {where}: {detail} Set `model.name` to a local folder holding a "
            "Qwen2-VL checkpoint (config.json, weights, tokenizer, preprocessor_config.json), or to `tiny` for the "
            "offline random test model. For a gated or private repo, accept its terms on the Hub and run "
            "`hf auth login`."
        ) from None
    model = model.to(torch_device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, mean, std, name, torch_device, torch_dtype)


def load_tokenizer(name: str, revision: str | None) -> tuple[Any, str | None]:
    """The tokenizer alone (for `annotate plan`), or None and why when it cannot be had without a download.

    An unreachable Hub is found in seconds (the tokenizer then comes from the cache, if it is there).
    """
    from transformers import AutoTokenizer

    if name == RANDOM_2B:
        return build_tiny_tokenizer(), None
    from annotator.hub import ModelUnavailable

    try:
        local_only, unreachable = _hub_access(name, revision)
    except ModelUnavailable as exc:
        return None, f"{exc.why}, and the cache does not hold it"
    source = str(tiny_model_dir()) if name == TINY else name
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, local_files_only=local_only), None
    except (OSError, ValueError) as exc:
        if unreachable is not None:
            return None, f"the Hub cannot be reached ({unreachable}), and the cache does not hold it whole"
        return None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
