"""Every check a run can make before it touches a file: output folder, input, output schema, tokens, device.

`annotate run`, `annotate resume` and `annotate plan` call `check_run`; it reads and writes nothing in the
output folder and loads no model (the tokenizer at most), so a mistake costs nothing that exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from annotator.errors import AnnotatorError
from annotator.recipe import Recipe


@dataclass
class CheckedRun:
    """What the checks opened, for the run to use: the input, the output schema, the tokenizer (if offline)."""

    source: Any
    schema: pa.Schema
    tokenizer: Any | None  # None: not to be had without the model's download; tokens are checked once it loads


def check_run(recipe: Recipe) -> CheckedRun:
    """Raise `AnnotatorError` for anything in the recipe that would fail later; returns what it opened."""
    from annotator.folder import check_target
    from annotator.models import check_attention, check_device, check_model_name, load_tokenizer
    from annotator.prompt import PromptBuilder
    from annotator.sink import RunFolder, output_schema
    from annotator.sources import open_source

    check_target(RunFolder(recipe.output_dir))
    check_device(recipe.model.device)
    check_attention(recipe.model.attn_implementation, recipe.model.device)
    check_model_name(recipe.model.name)
    source = open_source(recipe.input, recipe.prompt)
    check_apart(recipe, source)
    schema = output_schema(source.schema, recipe.input.image_column)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision)
    if tokenizer is not None:
        PromptBuilder(tokenizer, recipe.prompt)  # answers that are not one token, a tokenizer that is not Qwen2-VL's
    return CheckedRun(source, schema, tokenizer)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_apart(recipe: Recipe, source: Any) -> None:
    """The output folder must not be, hold, or sit inside the input: its files would be read back as input."""
    from annotator.sources import would_list

    output = os.path.realpath(recipe.output_dir)
    where = f"`output.dir` {str(recipe.output_dir)!r}"
    fix = "Set `output.dir` to a folder outside the input."
    for path in getattr(source, "files", []):
        if "://" not in str(path) and _within(os.path.realpath(path), output):
            raise AnnotatorError(f"{where} holds the input file {str(path)!r}. {fix}")
    spec = recipe.input.parquet
    if recipe.input.hf is not None and Path(recipe.input.hf.path).expanduser().is_dir():
        spec = str(Path(recipe.input.hf.path).expanduser())
    if spec is None:
        return
    spec_path = Path(spec).expanduser()
    if spec_path.is_dir() and _within(output, os.path.realpath(spec_path)):
        raise AnnotatorError(
            f"{where} is inside the input folder {spec!r}, so its files would be read as input by the next run "
            f"or resume. {fix}"
        )
    if not spec_path.exists() and would_list(spec, Path(recipe.output_dir) / "data" / "part-000000.parquet"):
        raise AnnotatorError(
            f"{where} lies where the input glob {spec!r} reaches, so its files would be read as input by the next "
            f"run or resume. {fix}"
        )
