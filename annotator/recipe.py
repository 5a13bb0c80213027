"""Recipes: YAML validated into typed settings, with `--set` overrides and readable errors."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from annotator.errors import AnnotatorError

# The seed's exact question: the newline and the 24 spaces are part of the prompt it was tuned with.
SEED_QUESTION = '请回答以下问题，务必只能回复一个词 "Y"或 "N"：\n                        图片和"{text}"是否相关？'
OUTPUT_COLUMNS = ("row_id", "prob", "label", "answer_mass", "error", "error_kind")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HFInput(_Section):
    """A Hugging Face dataset: a hub id or a local builder/folder."""

    path: str
    name: str | None = None
    split: str = "train"
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    revision: str | None = None
    streaming: bool = True


class InputConfig(_Section):
    parquet: str | None = Field(None, description="A parquet file, a folder of them, or a glob.")
    hf: HFInput | None = Field(None, description="A Hugging Face dataset instead of parquet files.")
    image_column: str = "image"
    text_column: str | None = "caption"
    id_column: str | None = None
    limit: int | None = Field(None, ge=1, description="Annotate only the first N rows.")
    max_image_pixels: int = Field(
        100_000_000, ge=1, description="Images claiming more pixels are refused before decoding."
    )


class ModelConfig(_Section):
    name: str = "Qwen/Qwen2-VL-2B-Instruct"
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    forward: Literal["lean", "transformers"] = Field(
        "lean",
        description="lean: annotator's own forward over the model's modules (no host sync, one attention call per"
        " layer; attn_implementation does not apply); transformers: the model's own forward. Same scores.",
    )
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Replay the lean forward from a CUDA graph per batch shape (GPU only; no effect on a CPU or with"
        " forward: transformers). auto: where measured to win (docs/performance.md). Same scores.",
    )
    min_pixels: int = Field(3136, ge=784)
    max_pixels: int = Field(307200, ge=784)
    jpeg_draft: bool = Field(
        True,
        description="Decode large JPEGs at a reduced DCT scale (>= 40 dB PSNR against a full decode, ~3.5x faster);"
        " false decodes every pixel, as the reference processor does.",
    )


class PromptConfig(_Section):
    system: str = "You are a helpful assistant."
    question: str = SEED_QUESTION
    query: str | None = Field(None, description="A fixed text used for every row instead of text_column.")
    positive: str = "Y"
    negative: str = "N"
    max_text_tokens: int = Field(256, ge=1)


class BatchingConfig(_Section):
    max_batch_tokens: int = Field(32768, ge=1)
    max_batch_size: int = Field(64, ge=1)
    window: int = Field(4096, ge=1)
    workers: int | Literal["auto"] = Field("auto", description="Preprocessing processes; 0 = in the main one.")
    image_timeout_s: float = Field(30.0, gt=0)
    shared_memory: bool = Field(
        True, description="Images to and from the workers through shared memory; false: through pipes."
    )


class OutputConfig(_Section):
    dir: str | None = Field(None, description="Defaults to outputs/<name>.")
    threshold: float = Field(0.5, ge=0.0, le=1.0)


class Recipe(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: InputConfig
    model: ModelConfig = ModelConfig()
    prompt: PromptConfig = PromptConfig()
    batching: BatchingConfig = BatchingConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        problems = []
        if (self.input.parquet is None) == (self.input.hf is None):
            problems.append("`input` needs exactly one of `input.parquet` (files) or `input.hf` (a dataset)")
        if self.prompt.query is None and not self.input.text_column:
            problems.append("set `input.text_column` to the caption column, or `prompt.query` to a fixed text")
        if self.prompt.question.count("{text}") != 1:
            problems.append("`prompt.question` must contain `{text}` exactly once: the caption goes there")
        if self.model.min_pixels > self.model.max_pixels:
            problems.append("`model.min_pixels` must not exceed `model.max_pixels`")
        if self.prompt.positive == self.prompt.negative:
            problems.append("`prompt.positive` and `prompt.negative` must differ")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir or f"outputs/{self.name}")

    def result_fingerprint(self) -> str:
        """A hash of every setting that changes a row's result (not batch sizes or devices)."""
        settings = {
            "input": self.input.model_dump(exclude={"limit"}),
            "model": self.model.model_dump(exclude={"device", "attn_implementation", "forward", "cuda_graphs"}),
            "prompt": self.prompt.model_dump(),
            "threshold": self.output.threshold,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `key.sub=value` strings into a nested dict; values are parsed as YAML scalars."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise AnnotatorError(
                f"--set {pair!r} is not of the form key=value. Use dotted recipe keys, "
                "e.g. --set model.name=tiny --set batching.max_batch_size=8."
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = overrides
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AnnotatorError(f"--set {key}: `{part}` is set both as a value and as a section.")
        node[leaf] = value
    return overrides


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively apply exactly the keys the user set; nothing else changes."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AnnotatorError(
            f"Recipe file {str(path)!r} does not exist. Pass the path of a YAML recipe, "
            "e.g. `annotate run recipes/filter_cats.yaml`."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise AnnotatorError(f"Recipe {str(path)!r} is not valid YAML: {exc}. Fix the syntax there.") from exc
    if not isinstance(data, dict):
        raise AnnotatorError(
            f"Recipe {str(path)!r} must be a YAML mapping with keys like `name:`, `input:`, `model:`; "
            f"it holds a {type(data).__name__}."
        )
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; every mistake becomes an `AnnotatorError`."""
    data = merge(read_recipe_file(path), parse_overrides(overrides or []))
    return validate_recipe(data, source=str(path))


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise AnnotatorError(explain_validation_error(exc, source)) from None


def _fields_at(location: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in location:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = [a for a in candidates if issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def explain_validation_error(exc: ValidationError, source: str) -> str:
    messages = []
    for error in exc.errors():
        location = tuple(p for p in error["loc"] if not isinstance(p, int))
        key = ".".join(str(p) for p in location) or "(top level)"
        if error["type"] == "extra_forbidden":
            valid = _fields_at(location[:-1])
            close = difflib.get_close_matches(str(location[-1]), valid, n=1)
            hint = f" Did you mean `{'.'.join([*map(str, location[:-1]), close[0]])}`?" if close else ""
            messages.append(f"`{key}` is not a recipe key.{hint} Valid keys here: {', '.join(valid) or 'none'}.")
        elif error["type"] == "missing":
            messages.append(f"`{key}` is required but missing; add it to the recipe.")
        elif error["type"] == "value_error":
            messages.append(str(error["msg"]).removeprefix("Value error, ") + ".")
        else:
            messages.append(f"`{key}`: {error['msg']} (got {error.get('input')!r}).")
    return f"Invalid recipe {source!r}: " + " ".join(messages) + " See README.md for every recipe key."


def frozen_recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
