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
    return Path(root).expanduser()  # `~` as in every other path (an .env file or a quoted value leaves it as written)


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


TINY_MARKER = ".annotator-tiny-model"


def make_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a small random Qwen2-VL (same classes and layout as the real one) into `directory`.

    `directory` must be new, empty, or a tiny model written before (it holds `.annotator-tiny-model`): nothing
    else is ever replaced. Files are written into a hidden folder inside it, then renamed into place one by one,
    so a process killed meanwhile leaves a folder this function finishes next time.
    """
    directory = Path(directory).expanduser()
    _check_tiny_target(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        marker = directory / TINY_MARKER
        marker.write_text(json.dumps({"complete": False}))  # first: a folder killed from now on is still ours
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
        try:
            names = _write_tiny_model(staging, seed)
            for name in names:
                os.replace(staging / name, directory / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for leftover in directory.glob(".staging-*"):  # of an earlier build that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        marker.write_text(json.dumps({"complete": True, "files": names}))
    except OSError as exc:
        raise AnnotatorError(
            f"Cannot write the tiny model into {str(directory)!r}: {exc.strerror or exc}. Give a folder you can "
            "write to (and free space there)."
        ) from None
    return directory


def _check_tiny_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise AnnotatorError(f"{str(directory)!r} is a file. Give a new or empty folder for the tiny model.")
    if not directory.is_dir() or (directory / TINY_MARKER).is_file():
        return
    names = sorted(os.listdir(directory))
    if names:
        shown = ", ".join(repr(n) for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise AnnotatorError(
            f"{str(directory)!r} is not empty (it holds {shown}) and is not a tiny model folder written by annotator, "
            "so nothing in it is replaced. Give a new or empty folder."
        )


def _write_tiny_model(folder: Path, seed: int) -> list[str]:
    """The tiny model's files written into `folder`; returns their names."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
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
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2))
    return sorted(os.listdir(folder))


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
    try:
        complete = json.loads((directory / TINY_MARKER).read_text()).get("complete")
    except (OSError, ValueError, AttributeError):
        # Folders written before the marker existed hold a whole model when they hold its config.
        complete = not (directory / TINY_MARKER).exists() and (directory / "config.json").is_file()
    if not complete:
        try:
            make_tiny_model(directory)
        except AnnotatorError as exc:
            raise AnnotatorError(
                f"{exc} (`model.name: tiny` is built once into annotator's cache folder: $ANNOTATOR_CACHE, else "
                f"$XDG_CACHE_HOME/annotator or ~/.cache/annotator, here {str(cache_dir())!r}; set ANNOTATOR_CACHE "
                "to a folder you can write to.)"
            ) from None
    return directory


def resolve_device(device: str):
    """The torch device for `model.device`; `check_device` has said it exists."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str) -> None:
    """`model.device` must name a device this machine has: cpu, cuda, cuda:N with N below the GPU count."""
    if device in ("auto", "cpu"):
        return
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise AnnotatorError(
            f"`model.device` = {device[:80]!r} is not a device annotator can use. Use auto, cpu, cuda or cuda:N."
        )
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise AnnotatorError(
                f"`model.device` = {device!r} asks for a GPU, but no GPU is visible here. Use `model.device: auto` "
                "or cpu."
            )
        if resolved.index is not None and resolved.index >= count:
            raise AnnotatorError(
                f"`model.device` = {device!r} does not exist: this machine has {count} GPU(s), cuda:0 to "
                f"cuda:{count - 1}. Pick one of them."
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise AnnotatorError(f"`model.device` = {device!r}, but MPS is not available here. Use auto or cpu.")


def check_attention(attn_implementation: str, device: str) -> None:
    """flash_attention_2 needs the flash-attn package and a GPU; the others work everywhere."""
    if attn_implementation != "flash_attention_2":
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise AnnotatorError(
            "`model.attn_implementation: flash_attention_2` needs the flash-attn package, which is not installed. "
            "Install it on a CUDA machine (pip install flash-attn --no-build-isolation), or use sdpa (the default)."
        )
    if device == "cpu" or (device == "auto" and not _cuda_available()):
        raise AnnotatorError(
            "`model.attn_implementation: flash_attention_2` runs on CUDA GPUs only. Use sdpa on this machine."
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_model_name(name: str) -> None:
    """A path-like `model.name` must be an existing folder (a Hub id is checked when it loads)."""
    from annotator.hub import is_hub_id

    if name in (TINY, RANDOM_2B):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AnnotatorError(f"`model.name` {name!r} is a file; give the folder that holds the checkpoint.")
        return
    if not is_hub_id(name):
        raise AnnotatorError(
            f"`model.name` {name[:200]!r} is neither a folder here nor a Hugging Face Hub id (owner/name). Set it to "
            "a local checkpoint folder, a hub id, or `tiny` for the offline test model."
        )


def random_model(config, dtype, device):
    """A Qwen2-VL of `config` with random weights, the same in every process on one kind of device: the writers of
    one run and a resumed run score with the same weights. The caller's random state is left as it was."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.manual_seed(0)
        if cuda:
            torch.cuda.manual_seed(0)
        return Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)


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


def hub_access(name: str, revision: str | None) -> tuple[bool, str | None]:
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
    name = str(Path(name).expanduser()) if name.startswith("~") else name
    local_only, unreachable = hub_access(name, revision)  # before torch is imported: an offline error at once
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
            model = random_model(config, torch_dtype, torch_device)
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
    except (OSError, ValueError, ImportError) as exc:  # ImportError: an attention package that cannot be used
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
        local_only, unreachable = hub_access(name, revision)
    except ModelUnavailable as exc:
        return None, f"{exc.why}, and the cache does not hold it"
    source = str(tiny_model_dir()) if name == TINY else str(Path(name).expanduser()) if name.startswith("~") else name
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, local_files_only=local_only), None
    except (OSError, ValueError) as exc:
        if unreachable is not None:
            return None, f"the Hub cannot be reached ({unreachable}), and the cache does not hold it whole"
        return None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
