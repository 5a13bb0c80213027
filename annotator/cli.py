"""The `annotate` command line: parses arguments, calls the library, turns its errors into messages."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.exceptions import TyperException

from annotator.errors import (
    EXIT_RESUMABLE,
    EXIT_USER_ERROR,
    AlreadyFinished,
    AnnotatorError,
    RunInterrupted,
    path_name_errors,
)

MAX_MESSAGE = 3000  # characters of an error message shown; a message never floods the terminal


class Commands(typer.core.TyperGroup):
    """Command-line mistakes (unknown option, bad value, no command) exit 1 like any user error: 2 means resumable."""

    @staticmethod
    def _as_user_error(exc: TyperException) -> None:
        if getattr(exc, "exit_code", None) == EXIT_RESUMABLE:  # click's usage errors exit 2
            exc.exit_code = EXIT_USER_ERROR

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except TyperException as exc:
            self._as_user_error(exc)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TyperException as exc:
            self._as_user_error(exc)
            raise


app = typer.Typer(
    cls=Commands,
    help="Score image-text relevance with Qwen2-VL: parquet or Hugging Face datasets in, labelled parquet out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# No emoji codes: rich would print a path, caption or address holding `:b:` or `:cat:` as a picture.
console = Console(stderr=True, emoji=False)
stdout = Console(emoji=False)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set model.name=tiny (repeatable)."),
]


DevicesOption = Annotated[
    str | None,
    typer.Option(
        "--devices",
        help="One writer per device of this machine, e.g. cuda:0,cuda:1 or cpu,cpu (recipe `engine.devices`; "
        "runs locally, whatever `engine.kind` says).",
    ),
]


def device_overrides(devices: str | None) -> list[str]:
    """`--devices a,b` as recipe overrides: those devices, on this machine, and no single `model.device`."""
    if devices is None:
        return []
    from annotator.recipe import device_problem, split_devices

    problem = None if devices == "auto" else device_problem(split_devices(devices))
    if problem is not None:  # said of --devices: the recipe's `engine.devices` is not what is wrong
        raise AnnotatorError(
            f"--devices {devices!r}: {problem}. Name devices of this machine, comma-separated, e.g. --devices "
            "cuda:0,cuda:1 or cpu,cpu (or auto)."
        )
    return [f"engine.devices={devices}", "engine.kind=local", "model.device=auto"]


class LogFormat(str, Enum):
    text = "text"
    json = "json"


LogFormatOption = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        help="text: a bar on a terminal, else one line per committed window; json: one JSON object per line.",
    ),
]


def _bounded(message: object) -> str:
    """A message cut to `MAX_MESSAGE` characters."""
    text = str(message)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + f"... ({len(text) - MAX_MESSAGE:,} more characters)"
    return text


def user_errors(command):
    """Exit 1 with the message for user mistakes, 2 for a resumable stop; never a traceback for either.

    The library raises `AnnotatorError` (a mistake: recipe, input, folder) or `RunInterrupted` (a signal, a failed
    write) at the depth where it knows what went wrong; anything else is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with path_name_errors():
                return command(*args, **kwargs)
        except AnnotatorError as exc:
            if not _as_json_line(exc, kwargs):
                from annotator.hub import ModelUnavailable, next_steps

                console.print(f"[bold red]Error:[/] {escape(_bounded(exc))}", highlight=False, soft_wrap=True)
                if isinstance(exc, ModelUnavailable) and "ctx" in kwargs:
                    console.print("To go on:", highlight=False)
                    typed = _typed_command(kwargs["ctx"])
                    for step in next_steps(typed, can_change_model=command.__name__ != "resume"):
                        console.print(f"  {step}", highlight=False, soft_wrap=True, markup=False)
            raise typer.Exit(exc.exit_code) from None
        except AlreadyFinished as exc:
            if not _as_json_line(exc, kwargs, event="already_finished"):
                console.print(f"[bold green]Done:[/] {escape(_bounded(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except RunInterrupted as exc:
            if not _as_json_line(exc, kwargs):
                console.print(f"[bold yellow]Interrupted:[/] {escape(_bounded(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            # Ctrl-C before the run loop took over signals (the model load says so itself): nothing is half-written.
            stopped = RunInterrupted(
                "before scoring began; nothing is half-written. Run the same command again (a run folder with "
                "committed windows continues with `annotate resume OUTPUT_DIR`)."
            )
            if not _as_json_line(stopped, kwargs):
                console.print(f"[bold yellow]Interrupted[/] {escape(str(stopped))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_RESUMABLE) from None

    return wrapper


def _as_json_line(
    exc: AnnotatorError | RunInterrupted | AlreadyFinished, kwargs: dict[str, Any], event: str = "error"
) -> bool:
    """With --log-format json a machine reads stderr: the error is one JSON line too. Whether it was printed so."""
    if kwargs.get("log_format") is not LogFormat.json:
        return False
    print(json.dumps({"event": event, "message": _bounded(exc), "exit_code": exc.exit_code}), file=sys.stderr)
    return True


def _typed_command(ctx: typer.Context) -> list[str]:
    """The running command as the user could type it again: its arguments, then the options given on the line."""
    words, options = ["annotate", ctx.info_name or ""], []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        value = value.value if isinstance(value, Enum) else value
        if not param.opts[0].startswith("-"):
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            options.append(param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0])
        else:
            for item in value if param.multiple else [value]:
                options += [param.opts[0], str(item)]
    return words + options


def _print_scores(status: dict) -> None:
    """The prob histogram on one line and the kept share at a few thresholds (and the run's own); per Y/N question
    for a run of several."""
    from annotator.scores import kept_shares

    lines = []
    if status["prob_histogram"] is not None:
        lines.append(
            ("prob", status["prob_histogram"], status["kept_share_at"], status["kept_share"], status["threshold"])
        )
    for name, counts in (status.get("questions") or {}).items():
        if counts.get("prob_histogram") is not None:
            shares = kept_shares(counts["prob_histogram"], status["rows_done"])
            lines.append((f"prob_{name}", counts["prob_histogram"], shares, None, None))
    width = max((len(line[0]) for line in lines), default=0)
    for line in lines:
        _score_lines(*line, width=width)


def _score_lines(
    column: str, counts: list, kept_at: dict, kept_share: float | None, threshold: float | None, width: int
) -> None:
    if not any(counts):
        return
    from annotator.scores import bars

    stdout.print(
        f"{column:<{width}}    0 [cyan]{bars(counts)}[/] 1   ({len(counts)} bins of {1 / len(counts):g})",
        highlight=False,
        soft_wrap=True,
    )
    shares = {float(t): f"{t}: {share:.1%}" for t, share in kept_at.items()}
    if kept_share is not None and threshold is not None:  # the run's own, exact from labels
        shares[threshold] = f"[bold]{threshold:g}: {kept_share:.1%} (threshold)[/]"
    line = " | ".join(text for _, text in sorted(shares.items()))
    stdout.print(
        f"{'kept':<{width}}    {column} >= {line}   of all rows (errors never)", highlight=False, soft_wrap=True
    )


def _print_summary(summary: dict) -> None:
    from annotator.status import run_status

    table = Table(title=f"annotated -> {summary['output_dir']}", show_header=False)
    for key in ("rows", "scored", "errors", "positives", "truncated_texts", "padding_efficiency", "rows_per_s"):
        if summary.get(key) is not None or key != "positives":
            table.add_row(key, str(summary.get(key)))
    for kind, count in summary.get("error_kinds", {}).items():
        table.add_row(f"  {kind}", str(count))
    _answer_rows(table, summary)
    stdout.print(table)
    _print_scores(run_status(Path(summary["output_dir"])))
    stdout.print(
        f"next: annotate report {summary['output_dir']}   (histograms and thumbnails, one HTML page)", highlight=False
    )


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
    ctx: typer.Context,
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
    limit: Annotated[int | None, typer.Option(help="Annotate only the first N rows.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in the output folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar, or log lines when not a terminal).")] = True,
    log_format: LogFormatOption = LogFormat.text,
    devices: DevicesOption = None,
) -> None:
    """Run a recipe into its output folder."""
    from annotator.run import run_recipe

    overrides = [*(set_ or []), *([f"input.limit={limit}"] if limit is not None else []), *device_overrides(devices)]
    _print_summary(run_recipe(str(recipe), overrides, overwrite, console, progress, log_format.value))


@app.command()
@user_errors
def resume(
    ctx: typer.Context,
    output_dir: Annotated[Path | None, typer.Argument(help="Run folder (default: latest unfinished run).")] = None,
    set_: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar, or log lines when not a terminal).")] = True,
    log_format: LogFormatOption = LogFormat.text,
    devices: DevicesOption = None,
) -> None:
    """Continue an interrupted run exactly where its committed windows end, with any engine or devices.

    Grow a finished pilot with --set input.limit=M (or =null for every row): its committed full windows are kept.
    """
    from annotator.run import resume_run

    root = str(output_dir) if output_dir else None
    _print_summary(resume_run(root, [*(set_ or []), *device_overrides(devices)], console, progress, log_format.value))


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
    """Progress, counts, label split, errors, lease and integrity (a missing or stray file: "damaged") of a run."""
    from annotator.status import run_status

    result = run_status(output_dir)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"status: {result['output_dir']}", show_header=False)
    keys = ("state", "rows", "windows", "scored", "errors", "positives", "negatives", "rows_per_s", "eta", "lock")
    for key in keys:
        if result[key] is not None or key not in ("positives", "negatives", "eta"):
            table.add_row(key, str(result[key]))
    for kind, count in result["error_kinds"].items():
        table.add_row(f"  {escape(kind)}", str(count))
    _answer_rows(table, result)
    for problem in result["problems"]:
        table.add_row("problem", escape(problem))
    if result["next"]:
        table.add_row("next", escape(result["next"]))
    stdout.print(table)
    _print_writers(result["writers"])
    _print_scores(result)


def _print_writers(writers: list[dict]) -> None:
    """The latest session's writers: one row each (host, device, windows, rows/s, heartbeat, state)."""
    if not writers:
        return
    table = Table(title="writers (latest session)")
    columns = ("host", "device", "windows", "rows", "rows_per_s", "heartbeat", "state")
    for column in columns:
        table.add_column(column)
    for w in writers:
        beat = f"{w['heartbeat_s_ago']:g} s ago" if w["heartbeat_s_ago"] is not None else "-"
        rate = "-" if w["rows_per_s"] is None else f"{w['rows_per_s']:,.1f}"
        table.add_row(w["host"], w["device"], str(w["windows"]), str(w["rows"]), rate, beat, w["state"])
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
    cuda_graphs: Annotated[str, typer.Option(help="model.cuda_graphs: auto, on or off")] = "auto",
    compile: Annotated[str, typer.Option(help="model.compile: auto, on or off")] = "auto",
    count_images: Annotated[int, typer.Option(help="Images per batch for the op/sync counts (0: skip).")] = 64,
    questions: Annotated[
        int, typer.Option(help="Ask K questions of every image, and time K against one on the same images.")
    ] = 1,
    baseline: Annotated[bool, typer.Option(help="Also time the naive one-pair-at-a-time loop.")] = False,
    baseline_pairs: Annotated[int, typer.Option(help="Pairs for the naive loop.")] = 32,
    host: Annotated[bool, typer.Option(help="Also count host CPU per pair and bytes per image (more runs).")] = True,
    devices: Annotated[
        str,
        typer.Option(help="Several devices (cuda:0,cuda:1 or cpu,cpu): scaling efficiency of one writer each vs one."),
    ] = "",
    window: Annotated[int, typer.Option(help="Rows per window with --devices (0: several windows per writer).")] = 0,
    ray: Annotated[
        bool, typer.Option(help="With --devices: also as many Ray actors, with Ray's start-up cost.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Throughput benchmark on synthetic images: pairs/s, tokens/s, padding, MFU, memory, preprocessing rate.

    With --devices: pairs/s of one writer and of one writer per device, their scaling efficiency, the coordinator's
    CPU per window, and (--ray) Ray's start-up cost.
    """
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
            cuda_graphs=cuda_graphs,
            compile=compile,
            count_images=count_images,
            questions=questions,
            baseline=baseline,
            baseline_pairs=baseline_pairs,
            host=host,
            devices=devices,
            window=window,
            ray=ray,
        ),
        console,
    )
    _print_result(result, as_json, "annotate bench")


@app.command()
@user_errors
def export(
    output_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    to: Annotated[Path, typer.Option("--to", help="Folder for the kept rows.")],
    min_prob: Annotated[float | None, typer.Option(help="Keep rows with prob >= P.")] = None,
    label: Annotated[str | None, typer.Option(help="Keep rows whose label is true or false.")] = None,
    top_fraction: Annotated[
        float | None,
        typer.Option(help="Keep the top F of all rows by prob (round(F x rows), ties to the lower row_id)."),
    ] = None,
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

    result = export_run(output_dir, to, min_prob, label, rejected, drop_columns, rows_per_shard, top_fraction, where)
    stdout.print(
        f"kept {result['kept']} rows -> {to}" + (f"; rejected {result['rejected']} -> {rejected}" if rejected else "")
    )


@app.command()
@user_errors
def report(
    output_dir: Annotated[Path, typer.Argument(help="A run folder (finished or not).")],
    out: Annotated[Path | None, typer.Option(help="The HTML file to write (default: OUTPUT_DIR/report.html).")] = None,
    thumbnails: Annotated[int, typer.Option(help="Thumbnails per grid.")] = 12,
) -> None:
    """One self-contained HTML page: counts, histograms, kept share vs threshold, thumbnails, throughput, recipe."""
    from annotator.report import write_report

    path = write_report(output_dir, out, thumbnails)
    stdout.print(
        f"report -> {path}  (one file, no network needed: open it in a browser)", highlight=False, soft_wrap=True
    )


@app.command("bench-report")
@user_errors
def bench_report(
    rows: Annotated[int, typer.Option(min=1, help="Rows of the synthetic run.")] = 1_000_000,
    questions: Annotated[
        int, typer.Option(min=1, max=26, help="Questions per row (K > 1: K-1 yes/no and one of three answers).")
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time `report`, `status` and `export --top-fraction` (`--where` with several questions) on a synthetic
    finished run of ROWS rows."""
    from annotator.fake_run import bench_reading

    _print_result(bench_reading(rows, console, questions), as_json, "annotate bench-report")


def _print_result(result: dict[str, Any], as_json: bool, title: str) -> None:
    """A benchmark's figures: one JSON object, or a two-column table."""
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=title, show_header=False)
    for key, value in result.items():
        table.add_row(key, str(value))
    stdout.print(table)


class ReaderSafeStream:
    """Standard output or error that may stop taking writes: its reader went away (`annotate run ... 2>&1 | head`,
    a closed terminal tab) or it is a full disk (`> /dev/full`). The first write that fails points the descriptor at
    /dev/null and the command goes on: a run finishes (run.log keeps every line) and exits with its own code, where
    click answered a broken pipe with a silent exit 1 and other write errors were tracebacks."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._drop_output()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._drop_output()

    def _drop_output(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):
            self._stream.flush()  # what was buffered goes to /dev/null now

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_standard_streams() -> None:
    """stdout and stderr as `ReaderSafeStream`s (once; a closed one stays None), for a console script's start."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, ReaderSafeStream):
            setattr(sys, name, ReaderSafeStream(stream))


def main() -> None:
    """The `annotate` console script."""
    guard_standard_streams()
    try:
        app()
    except SystemExit as done:
        if done.code == EXIT_RESUMABLE:
            # A stopped run leaves as soon as its exit handlers ran (a further Ctrl-C meanwhile exits 2 at once):
            # past them, the interpreter's slow teardown runs without signal handlers, and a second Ctrl-C there
            # would kill it with another exit code.
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_RESUMABLE)
        raise
