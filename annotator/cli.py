"""The `annotate` command line: parses arguments, calls the library, turns its errors into messages."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from annotator.errors import EXIT_RESUMABLE, AnnotatorError, RunInterrupted

app = typer.Typer(
    help="Score image-text relevance with Qwen2-VL: parquet or Hugging Face datasets in, labelled parquet out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
stdout = Console()

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set model.name=tiny (repeatable)."),
]


def user_errors(command):
    """Exit 1 with the message for user mistakes, 2 for a resumable stop; never a traceback for either."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AnnotatorError as exc:
            console.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except RunInterrupted as exc:
            console.print(f"[bold yellow]Interrupted:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            # Ctrl-C before the run loop took over signals (e.g. while the model loads): nothing is half-written.
            console.print("[bold yellow]Interrupted.[/] Committed windows are safe; continue with `annotate resume`.")
            raise typer.Exit(EXIT_RESUMABLE) from None

    return wrapper


def _print_summary(summary: dict) -> None:
    table = Table(title=f"annotated -> {summary['output_dir']}", show_header=False)
    for key in ("rows", "scored", "errors", "positives", "truncated_texts", "padding_efficiency", "pairs_per_s"):
        if summary.get(key) is not None or key != "positives":
            table.add_row(key, str(summary.get(key)))
    for kind, count in summary.get("error_kinds", {}).items():
        table.add_row(f"  {kind}", str(count))
    _answer_rows(table, summary)
    stdout.print(table)


def _answer_rows(table: Table, counts: dict) -> None:
    """Per question of a run: its labels split (Y/N) or how often each answer won."""
    scored = counts.get("scored") or 0
    if "answers" in counts:
        table.add_row("answers", _answer_split(counts["answers"]))
    for name, question in counts.get("questions", {}).items():
        if "positives" in question:
            positives = question["positives"]
            table.add_row(f"label_{name}", f"{positives} true / {scored - positives} false")
        else:
            table.add_row(f"answer_{name}", _answer_split(question.get("answers", {})))


def _answer_split(answers: dict) -> str:
    return ", ".join(f"{answer}: {n}" for answer, n in answers.items())


@app.command()
@user_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
    limit: Annotated[int | None, typer.Option(help="Annotate only the first N rows.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in the output folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Run a recipe into its output folder."""
    from annotator.run import run_recipe

    overrides = [*(set_ or []), *([f"input.limit={limit}"] if limit is not None else [])]
    _print_summary(run_recipe(str(recipe), overrides, overwrite, console, progress))


@app.command()
@user_errors
def resume(
    output_dir: Annotated[Path | None, typer.Argument(help="Run folder (default: latest unfinished run).")] = None,
    set_: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Continue an interrupted run exactly where its committed windows end."""
    from annotator.run import resume_run

    _print_summary(resume_run(str(output_dir) if output_dir else None, set_ or [], console, progress))


@app.command()
@user_errors
def plan(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
    limit: Annotated[int | None, typer.Option(help="Plan only the first N rows.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Dry run: rows, bucket histogram, padding efficiency, tokens and FLOPs. Loads no model."""
    from annotator.plan import plan_recipe
    from annotator.recipe import load_recipe

    overrides = [*(set_ or []), *([f"input.limit={limit}"] if limit is not None else [])]
    result = plan_recipe(load_recipe(recipe, overrides))
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"plan: {recipe}", show_header=False)
    table.add_row("rows", f"{result['rows']}")
    table.add_row("scorable rows", str(result["scorable"]))
    for kind, count in result["errors"].items():
        table.add_row(f"  error: {kind}", str(count))
    table.add_row("batches", str(result["batches"]))
    table.add_row("tokens (real / padded)", f"{result['real_tokens']:,} / {result['padded_tokens']:,}")
    table.add_row("padding efficiency", str(result["padding_efficiency"]))
    flops = result["flops"]
    table.add_row("FLOPs (Qwen2-VL-2B)", f"{flops['total'] / 1e12:,.2f} T (vision {flops['vision'] / 1e12:,.2f} T)")
    if result["flops_per_pair"]:
        table.add_row("FLOPs per pair", f"{result['flops_per_pair'] / 1e12:.3f} T")
    if "questions" in result:
        separate = result["flops_separate_runs"] / 1e12
        table.add_row(
            f"{len(result['questions'])} questions, shared",
            f"{flops['total'] / 1e12:,.2f} T = {result['cost_in_single_runs']} single-question runs "
            f"(a run per question: {separate:,.2f} T)",
        )
        for question in result["questions"]:
            table.add_row(
                f"  question {question['name']}",
                f"adds {question['flops_added'] / 1e12:,.3f} T ({question['tokens']:,} tokens); "
                f"alone {question['flops_alone'] / 1e12:,.2f} T",
            )
    if result["note"]:
        table.add_row("note", result["note"])
    stdout.print(table)
    buckets = Table(title="buckets (image grid t x h x w, in 14 px patches)")
    for column in ("grid", "image tokens", "rows"):
        buckets.add_column(column)
    for bucket in result["buckets"][:20]:
        buckets.add_row("x".join(map(str, bucket["grid"])), str(bucket["image_tokens"]), str(bucket["rows"]))
    if len(result["buckets"]) > 20:
        buckets.add_row("...", "", f"{len(result['buckets']) - 20} more buckets")
    stdout.print(buckets)


@app.command()
@user_errors
def status(
    output_dir: Annotated[Path | None, typer.Argument(help="Run folder (default: latest run).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Progress, counts, label split and errors of a run."""
    from annotator.status import run_status

    result = run_status(output_dir)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"status: {result['output_dir']}", show_header=False)
    for key in ("state", "rows", "windows", "scored", "errors", "positives", "negatives", "rows_per_s", "lock"):
        if result[key] is not None or key not in ("positives", "negatives"):
            table.add_row(key, str(result[key]))
    for kind, count in result["error_kinds"].items():
        table.add_row(f"  {kind}", str(count))
    _answer_rows(table, result)
    if result["next"]:
        table.add_row("next", result["next"])
    stdout.print(table)


@app.command("make-tiny-model")
@user_errors
def make_tiny_model(directory: Annotated[Path, typer.Argument(help="Folder to write the model into.")]) -> None:
    """Write the small random Qwen2-VL test model (what `model.name: tiny` uses) into DIRECTORY."""
    from annotator.models import make_tiny_model as build

    stdout.print(f"tiny Qwen2-VL written to {build(directory)}")


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def bench(
    model: Annotated[str, typer.Option(help="tiny, qwen2-vl-2b-random, a hub id or a folder.")] = "tiny",
    sizes: Annotated[str, typer.Option(help="Image sizes WxH, comma-separated (default: a realistic mix).")] = "",
    image_format: Annotated[str, typer.Option("--format", help="jpeg or png")] = "jpeg",
    pairs: Annotated[int, typer.Option(help="Pairs to score.")] = 256,
    max_pixels: Annotated[int, typer.Option(help="model.max_pixels")] = 307200,
    max_batch_tokens: Annotated[int, typer.Option(help="batching.max_batch_tokens")] = 32768,
    max_batch_size: Annotated[int, typer.Option(help="batching.max_batch_size")] = 64,
    workers: Annotated[str, typer.Option(help="Preprocessing processes (auto or a number).")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="sdpa, eager or flash_attention_2")] = "sdpa",
    forward: Annotated[str, typer.Option(help="model.forward: lean or transformers")] = "lean",
    count_images: Annotated[int, typer.Option(help="Images per batch for the op/sync counts (0: skip).")] = 64,
    questions: Annotated[
        int, typer.Option(help="Ask K questions of every image, and time K against one on the same images.")
    ] = 1,
    baseline: Annotated[bool, typer.Option(help="Also time the naive one-pair-at-a-time loop.")] = False,
    baseline_pairs: Annotated[int, typer.Option(help="Pairs for the naive loop.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Throughput benchmark on synthetic images: pairs/s, tokens/s, padding, MFU, memory, preprocessing rate."""
    from annotator.bench import BenchConfig, run_bench

    result = run_bench(
        BenchConfig(
            model=model,
            sizes=sizes,
            image_format=image_format,
            pairs=pairs,
            max_pixels=max_pixels,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            workers=workers,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            forward=forward,
            count_images=count_images,
            questions=questions,
            baseline=baseline,
            baseline_pairs=baseline_pairs,
        ),
        console,
    )
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title="annotate bench", show_header=False)
    for key, value in result.items():
        table.add_row(key, str(value))
    stdout.print(table)


@app.command()
@user_errors
def export(
    output_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    to: Annotated[Path, typer.Option("--to", help="Folder for the kept rows.")],
    min_prob: Annotated[float | None, typer.Option(help="Keep rows with prob >= P.")] = None,
    label: Annotated[str | None, typer.Option(help="Keep rows whose label is true or false.")] = None,
    where: Annotated[
        str | None,
        typer.Option(help='Keep rows where this is true, e.g. "label_cat and not label_text" (see README).'),
    ] = None,
    rejected: Annotated[Path | None, typer.Option(help="Also write the rows not kept here.")] = None,
    drop_columns: Annotated[str, typer.Option(help="Comma-separated columns to leave out.")] = "",
    rows_per_shard: Annotated[int, typer.Option(help="Rows per output parquet file.")] = 10000,
) -> None:
    """Write the kept (and optionally the rejected) rows of a run as a dataset with a dataset card."""
    from annotator.export import export_run

    result = export_run(output_dir, to, min_prob, label, rejected, drop_columns, rows_per_shard, where)
    stdout.print(
        f"kept {result['kept']} rows -> {to}" + (f"; rejected {result['rejected']} -> {rejected}" if rejected else "")
    )


def main() -> None:  # pragma: no cover - console script entry
    sys.exit(app())
