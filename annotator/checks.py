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
    tokenizer_note: str | None = None  # why there is no tokenizer


def check_run(recipe: Recipe, loads_model: bool = True) -> CheckedRun:
    """Raise `AnnotatorError` for anything in the recipe that would fail later; returns what it opened.

    With `loads_model` (run, resume) a Hub model that cannot be had (the Hub unreachable, the cache without it) is
    an error here too, before anything is written; `plan` goes on without it.
    """
    from annotator.executors import check_engine
    from annotator.folder import check_target
    from annotator.models import check_attention, check_device, check_model_name, hub_access, load_tokenizer
    from annotator.prompt import PromptBuilder
    from annotator.sink import RunFolder, output_schema
    from annotator.sources import open_source

    check_target(RunFolder(recipe.output_dir))
    check_device(recipe.model.device)
    check_attention(recipe.model.attn_implementation, recipe.model.device)
    check_compile_setting(recipe)
    check_model_name(recipe.model.name)
    if loads_model:
        hub_access(recipe.model.name, recipe.model.revision)
    source = open_source(recipe.input, recipe.prompt)
    check_apart(recipe, source)
    schema = output_schema(source.schema, recipe.input.image_column, recipe.questions)
    tokenizer, why = load_tokenizer(recipe.model.name, recipe.model.revision)
    if tokenizer is not None:
        # answers that are not one token, a tokenizer that is not Qwen2-VL's
        PromptBuilder(tokenizer, recipe.prompt, recipe.questions)
    if loads_model or recipe.engine.devices != "auto":
        # Last: on Ray this joins or starts it, which only a run whose every other setting holds should do.
        check_engine(recipe)  # devices that exist, or a Ray that can place the writers
    elif recipe.engine.kind == "ray":  # `plan`: Ray there, and the cluster it names answering; only a run joins it
        from annotator.ray_address import check_address
        from annotator.ray_engine import check_ray

        check_ray()
        check_address(recipe.engine.ray.address)
    return CheckedRun(source, schema, tokenizer, why)


def check_compile_setting(recipe: Recipe) -> None:
    """`model.compile: on` and what it needs on the devices this machine's writers use (Ray's check their own), and
    PyTorch's compile cache folder, which it creates compiling or not."""
    from annotator.compiling import check_cache_folder, check_compile
    from annotator.executors import resolve_devices

    check_cache_folder()  # PyTorch uses it whatever `model.compile` says
    m = recipe.model
    if m.compile != "on":
        return
    local = recipe.engine.kind == "local"
    types = {device.split(":")[0] for device in resolve_devices(recipe)} if local else set()
    check_compile(m.compile, m.forward, m.cuda_graphs, types)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_apart(recipe: Recipe, source: Any) -> None:
    """The output folder must not hold the input, nor lie where the input is searched (its files would be read
    back as input by the next run or resume), symbolic links included."""
    output = Path(recipe.output_dir)
    where = f"`output.dir` {str(output)!r}"
    fix = "Set `output.dir` to a folder outside the input."
    real = os.path.realpath(output)
    for path in getattr(source, "files", []):
        if "://" not in str(path) and _within(os.path.realpath(path), real):
            raise AnnotatorError(f"{where} holds the input file {str(path)!r}. {fix}")
    listing = getattr(source, "listing", None)
    if listing is not None and listing.would_read(output / "data" / "part-000000.parquet"):
        raise AnnotatorError(
            f"{where} lies where the input {recipe.input.parquet!r} is searched, so the files a run writes there "
            f"would be read as input by the next run or resume. {fix}"
        )
    if recipe.input.hf is not None:
        folder = Path(recipe.input.hf.path).expanduser()
        if folder.is_dir() and _within(real, os.path.realpath(folder)):
            raise AnnotatorError(
                f"{where} is inside the input dataset's folder {recipe.input.hf.path!r}, so its files could be "
                f"read as input by the next run or resume. {fix}"
            )
