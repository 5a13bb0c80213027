"""Recipes: YAML validated into typed settings, with `--set` overrides and readable errors."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import reprlib
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from annotator.errors import AnnotatorError
from annotator.questions import PLACEHOLDER, Question, question_problems, resolve_questions, uses_text

# The seed's exact question: the newline and the 24 spaces are part of the prompt it was tuned with.
SEED_QUESTION = '请回答以下问题，务必只能回复一个词 "Y"或 "N"：\n                        图片和"{text}"是否相关？'
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few kilobytes; anything this big is some other file
MAX_YAML_VALUES = 100_000  # values a recipe may expand to, aliases counted at every use (a YAML bomb has billions)
MAX_YAML_DEPTH = 64  # a recipe nests four levels; far deeper would overflow YAML's recursive composer


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


def _switch(value: Any) -> Any:
    """YAML reads a bare on/off (`cuda_graphs: on`, `--set model.compile=off`) as true/false: the switch meant."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch)]


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
    cuda_graphs: Switch = Field(
        "auto",
        description="Replay the lean forward from a CUDA graph per batch shape (GPU only; no effect on a CPU or with"
        " forward: transformers). auto: where measured to win (docs/performance.md). Same scores.",
    )
    compile: Switch = Field(
        "auto",
        description="Run the lean forward's vision blocks and decoder layers through torch.compile, which fuses the"
        " elementwise work between matrix products (compiled once, at load: tens of seconds). auto: where measured"
        " to win (docs/performance.md). Same scores (float32: <= 1e-5).",
    )
    min_pixels: int = Field(3136, ge=784)
    max_pixels: int = Field(307200, ge=784)
    jpeg_draft: bool = Field(
        True,
        description="Decode large JPEGs at a reduced DCT scale (>= 40 dB PSNR against a full decode, ~3.5x faster);"
        " false decodes every pixel, as the reference processor does.",
    )


class QuestionConfig(_Section):
    """One of `prompt.questions` written as a mapping, with answers of its own."""

    question: str
    answers: list[str] | None = Field(None, description="Its answers, one token each: `probs_<name>`, `answer_<name>`.")
    positive: str | None = Field(None, description="Its yes answer (default `prompt.positive`).")
    negative: str | None = Field(None, description="Its no answer (default `prompt.negative`).")


class PromptConfig(_Section):
    system: str = "You are a helpful assistant."
    question: str = SEED_QUESTION
    query: str | None = Field(None, description="A fixed text used for every row instead of text_column.")
    positive: str = "Y"
    negative: str = "N"
    max_text_tokens: int = Field(256, ge=1)
    questions: dict[str, QuestionConfig] | None = Field(
        None,
        description="Several questions of every image, `name: question` (or `name: {question, answers}`), instead of"
        " `question`: the image and the system turn are computed once for all of them.",
    )
    answers: list[str] | None = Field(
        None, description="Answers beyond Y/N, one token each, instead of positive/negative: `probs`, `answer`."
    )

    @field_validator("questions", mode="before")
    @classmethod
    def _question_entries(cls, questions: Any) -> Any:
        """`name: text` is `name: {question: text}`; a name is the text written (YAML would read `1:` as a number)."""
        if not isinstance(questions, dict):
            return questions
        return {str(k): {"question": v} if isinstance(v, str) else v for k, v in questions.items()}


class BatchingConfig(_Section):
    max_batch_tokens: int = Field(32768, ge=1)
    max_batch_size: int = Field(64, ge=1)
    window: int = Field(4096, ge=1)
    workers: Annotated[int, Field(ge=0, le=1024)] | Literal["auto"] = Field(
        "auto", description="Preprocessing processes; 0 = in the main one."
    )
    image_timeout_s: float = Field(30.0, gt=0)
    shared_memory: bool = Field(
        True, description="Images to and from the workers through shared memory; false: through pipes."
    )


class OutputConfig(_Section):
    dir: str | None = Field(None, description="Defaults to outputs/<name>.")
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    thresholds: Annotated[dict[str, float], BeforeValidator(lambda value: {} if value is None else value)] = Field(
        default_factory=dict,
        description="Per question of `prompt.questions`: `label_<name> = prob_<name> >= t`; null: none (so that"
        " `--set output.thresholds=null` clears them, as `prompt.questions=null` clears the questions).",
    )


DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class RayConfig(_Section):
    address: str | None = Field(
        None, description="null starts a Ray on this machine; `auto` joins the cluster this node belongs to."
    )
    workers: int | None = Field(
        None, ge=1, description="Writers (actors): null = one per GPU of the cluster, or as many CPU ones as fit."
    )
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each writer reserves for decoding; null = the cluster's CPUs shared out."
    )
    reserved_cpus: float = Field(
        1.0, ge=0, description="CPUs no writer may take: left for Ray itself and reads, so it cannot deadlock."
    )


class EngineConfig(_Section):
    """How windows are scheduled: never changes results, so a run may be resumed by another engine."""

    kind: Literal["local", "ray"] = "local"
    devices: Literal["auto"] | list[str] = Field(
        "auto", description="local: auto = every visible GPU, else one cpu; or a list such as [cuda:0, cuda:1]."
    )
    ray: RayConfig = RayConfig()

    @field_validator("devices", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return split_devices(value) if isinstance(value, str) and value != "auto" else value

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, value: Any) -> Any:
        if isinstance(value, list):
            problem = device_problem(value)
            if problem is not None:
                raise ValueError(f"`engine.devices`: {problem}")
            # One spelling per GPU (`cuda:00` is `cuda:0`), so that a GPU named twice is seen as one.
            return [f"cuda:{int(d[5:])}" if d.startswith("cuda:") else d for d in value]
        return value


def split_devices(text: str) -> list[str]:
    """`cuda:0, cuda:1` as a list of devices."""
    return [part.strip() for part in text.split(",") if part.strip()]


def device_problem(devices: list[str]) -> str | None:
    """What is wrong with a list of devices (`engine.devices`, `--devices`), or None."""
    if not devices:
        return "needs at least one device, e.g. [cuda:0] or auto"
    wrong = [d for d in devices if not DEVICE.fullmatch(d)]
    return f"{', '.join(map(repr, wrong))} is not cpu, cuda or cuda:N" if wrong else None


class Recipe(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: InputConfig
    model: ModelConfig = ModelConfig()
    prompt: PromptConfig = PromptConfig()
    batching: BatchingConfig = BatchingConfig()
    output: OutputConfig = OutputConfig()
    engine: EngineConfig = EngineConfig()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        problems = []
        if (self.input.parquet is None) == (self.input.hf is None):
            problems.append("`input` needs exactly one of `input.parquet` (files) or `input.hf` (a dataset)")
        if self.prompt.query is None and not self.input.text_column and self.uses_text:
            problems.append("set `input.text_column` to the caption column, or `prompt.query` to a fixed text")
        question = self.prompt.question
        if self.prompt.questions is None and question.strip() and not PLACEHOLDER.search(question):
            # (twice, a misspelt placeholder or an empty question: `question_problems` says which)
            problems.append("`prompt.question` must contain `{text}` exactly once: the caption goes there")
        if self.model.min_pixels > self.model.max_pixels:
            problems.append("`model.min_pixels` must not exceed `model.max_pixels`")
        if self.prompt.positive == self.prompt.negative:
            problems.append("`prompt.positive` and `prompt.negative` must differ")
        if self.engine.devices != "auto" and self.engine.kind == "ray":
            problems.append(
                "`engine.devices` is for `engine.kind: local`; on Ray set `engine.ray.workers` (one GPU each)"
            )
        if self.engine.devices != "auto" and self.model.device != "auto":
            problems.append("set the device in one place: `engine.devices` (several) or `model.device` (one), not both")
        for key, value in (
            ("output.dir", self.output.dir),
            ("input.parquet", self.input.parquet),
            ("model.name", self.model.name),
        ):
            if value is not None and not value.strip():
                problems.append(f"`{key}` is empty; give a path (an empty path is never taken as the current folder)")
        problems.extend(question_problems(self.prompt, self.output))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir or f"outputs/{self.name}").expanduser()

    @property
    def questions(self) -> list[Question]:
        """The questions every image is asked, in the recipe's order, with their answers and thresholds."""
        return resolve_questions(self.prompt, self.output)

    @property
    def uses_text(self) -> bool:
        """Whether any question puts the row's text (`{text}`) in: else no text is read."""
        return uses_text(self.prompt)

    def result_fingerprint(self) -> str:
        """A hash of every setting that changes a row's result (not batch sizes or devices)."""
        several = self.prompt.questions is not None or self.prompt.answers is not None
        settings = {
            "input": self.input.model_dump(exclude={"limit"}),
            "model": self.model.model_dump(
                exclude={"device", "attn_implementation", "forward", "cuda_graphs", "compile"}
            ),
            # A recipe of one Y/N question hashes as it did before questions existed, so its runs still resume.
            "prompt": self.prompt.model_dump(exclude=None if several else {"questions", "answers"}),
            "threshold": self.output.threshold,
        }
        if several or self.output.thresholds:
            # Resolved, in order: names, texts, answers and thresholds are what the columns hold, and their order.
            settings["questions"] = [q.fingerprint() for q in self.questions]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `key.sub=value` strings into a nested dict; values are parsed as YAML scalars."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise AnnotatorError(
                f"--set {_short(pair)} is not of the form key=value. Use dotted recipe keys, "
                "e.g. --set model.name=tiny --set batching.max_batch_size=8."
            )
        try:
            value = load_yaml(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and value and all(v is None for v in value.values()):
            value = raw  # `{text}` or `{a, b}`: YAML reads a mapping of nulls, which no recipe key takes; a template
        node = overrides
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AnnotatorError(f"--set {_cut(key)}: `{_cut(part)}` is set both as a value and as a section.")
        node[leaf] = value
    return overrides


class _BoundedLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses documents expanding to more than `MAX_YAML_VALUES` values."""

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Count the values a document expands to, each alias at every use, without expanding it."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise yaml.YAMLError(f"it expands to more than {MAX_YAML_VALUES:,} values (aliases repeated)")
            continue
        if id(node) in sizes:
            continue
        if id(node) in on_path:
            raise yaml.YAMLError("an alias refers to the value that holds it")
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


_OPEN = (
    yaml.FlowSequenceStartToken,
    yaml.FlowMappingStartToken,
    yaml.BlockSequenceStartToken,
    yaml.BlockMappingStartToken,
)
_CLOSE = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)


def _check_depth(text: str) -> None:
    """Refuse deep nesting from the tokens (the scanner is a loop), before the recursive composer could overflow."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        depth += isinstance(token, _OPEN) - isinstance(token, _CLOSE)
        if depth > MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"it is nested too deeply (over {MAX_YAML_DEPTH} levels)")


def load_yaml(text: str, recipe: bool = False) -> Any:
    """YAML with bounded cost: alias bombs and absurd nesting are a `yaml.YAMLError`, never hours or gigabytes.

    A `recipe` document reads its keys as written and refuses a key given twice (`_UniqueKeyLoader`).
    """
    _check_depth(text)
    return yaml.load(text, Loader=_UniqueKeyLoader if recipe else _BoundedLoader)  # noqa: S506 - SafeLoader subclasses


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any, limit: int = 200) -> str:
    """A value as a message shows it: repr, cut to a readable size."""
    shower = reprlib.Repr()  # Python 3.11 takes no keyword arguments here
    shower.maxstring, shower.maxother, shower.maxlist, shower.maxdict, shower.maxlevel = limit, limit, 6, 6, 3
    return _cut(shower.repr(value), limit)


NAMED_ENTRIES = {("prompt", "questions"), ("output", "thresholds")}  # mappings whose keys are names, not recipe keys


def merge(base: dict[str, Any], overrides: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Recursively apply exactly the keys the user set; nothing else changes.

    A question written in short form (`prompt.questions.NAME: text`) is `{question: text}`, so that setting one of
    its keys (`--set prompt.questions.NAME.positive=y`) keeps its text. Null for one entry of a mapping of names
    (`--set prompt.questions.NAME=null`, `output.thresholds.NAME`) removes that entry.
    """
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if value is None and path in NAMED_ENTRIES:
            if key not in merged:
                names = f"there are: {_cut(', '.join(map(str, merged)))}" if merged else "the recipe has none"
                raise AnnotatorError(
                    f"--set {'.'.join(path)}.{_cut(str(key))}=null removes an entry, but there is none named "
                    f"{_cut(str(key))!r} ({names}). Check the name."
                )
            del merged[key]
            continue
        if isinstance(value, dict) and isinstance(current, str) and path == ("prompt", "questions"):
            current = {"question": current}
        if isinstance(value, dict) and current is None:
            current = {}  # applied key by key, so that a null entry removes nothing silently
        if isinstance(value, dict) and isinstance(current, dict):
            merged[key] = merge(current, value, (*path, str(key)))
        else:
            merged[key] = value
    return merged


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(_BoundedLoader):
    """The bounded safe loader, except that a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_document(self, node: yaml.Node) -> Any:
        self.root = node
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Keys as written: every key of a recipe is a name (`1:` and `yes:` are the names "1" and "yes")."""
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
            else:
                key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(self._path(key_node), lines[key], line)
            lines[key] = line
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping

    def _path(self, target: yaml.Node) -> str:
        """The dotted key of `target` in the document (`prompt.questions.cat`)."""

        def search(node: yaml.Node, parts: list[str]) -> list[str] | None:
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    here = [*parts, str(key_node.value)]
                    if key_node is target:
                        return here
                    found = search(value_node, here)
                    if found is not None:
                        return found
            return None

        return ".".join(search(self.root, []) or [str(target.value)])


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The recipe file as a mapping; each way it can be wrong is an `AnnotatorError` saying which."""
    path = Path(path).expanduser()
    shown = _short(str(path))
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AnnotatorError(
            f"Recipe file {shown} does not exist. Pass the path of a YAML recipe, "
            "e.g. `annotate run recipes/filter_cats.yaml`."
        ) from None
    except OSError as exc:
        raise AnnotatorError(f"Recipe file {shown} cannot be read: {exc.strerror or exc}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise AnnotatorError(f"Recipe {shown} is a folder. Pass the path of a YAML recipe file inside it.")
    if not stat.S_ISREG(info.st_mode):
        raise AnnotatorError(f"Recipe {shown} is not a regular file (a FIFO or device?). Pass a YAML recipe file.")
    if info.st_size > MAX_RECIPE_BYTES:
        raise AnnotatorError(
            f"Recipe {shown} is {info.st_size:,} bytes; a recipe is a small YAML file (at most "
            f"{MAX_RECIPE_BYTES:,} bytes). Did you pass a data file instead of the recipe?"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AnnotatorError(f"Recipe file {shown} cannot be read: {exc.strerror or exc}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        hint = (
            " It is a parquet file: pass the recipe, and name this file in its `input.parquet`."
            if raw.startswith(b"PAR1")
            else ""
        )
        raise AnnotatorError(
            f"Recipe {shown} is not UTF-8 text (byte {exc.start} is invalid).{hint} Save the recipe as UTF-8."
        ) from None
    try:
        data = load_yaml(text, recipe=True)
    except _DuplicateKey as exc:
        raise AnnotatorError(
            f"Recipe {shown} gives `{exc.key}` twice (lines {exc.first} and {exc.second}); YAML would keep "
            "only the last one silently. Keep one of them (two questions need two different names)."
        ) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise AnnotatorError(f"Recipe {shown} is not valid YAML: {_short(detail, 400)}. Fix it there.") from None
    if not isinstance(data, dict):
        raise AnnotatorError(
            f"Recipe {shown} must be a YAML mapping with keys like `name:`, `input:`, `model:`; "
            f"it holds a {type(data).__name__}."
        )
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; every mistake becomes an `AnnotatorError`."""
    changes = parse_overrides(overrides or [])
    return validate_recipe(merge(read_recipe_file(path), changes), source=str(path), changes=changes)


def validate_recipe(data: dict[str, Any], source: str = "recipe", changes: dict[str, Any] | None = None) -> Recipe:
    """`changes`: the `--set` overrides merged into `data`; a mistake in one is named as the --set, not the file's."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise AnnotatorError(explain_validation_error(exc, source, _set_paths(changes or {}))) from None


def _set_paths(changes: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The dotted keys of `--set` overrides, as tuples."""
    paths: list[tuple[str, ...]] = []
    for key, value in changes.items():
        here = (*path, str(key))
        paths.extend(_set_paths(value, here) if isinstance(value, dict) and value else [here])
    return paths


def _from_set(location: tuple[Any, ...], set_paths: list[tuple[str, ...]]) -> str:
    """` (from --set)` when the key at `location` (or a key inside it) was given on the command line."""
    location = tuple(str(p) for p in location)
    hit = location and any(p[: len(location)] == location or location[: len(p)] == p for p in set_paths)
    return " (from --set)" if hit else ""


def _fields_at(location: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    parts = iter(location)
    for part in parts:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        args = getattr(annotation, "__args__", (annotation,))
        mappings = [a for a in args if getattr(a, "__origin__", None) is dict]
        if mappings:  # `name: {...}` entries (prompt.questions): the next part is a name, not a key
            args = mappings[0].__args__[1:]
            next(parts, None)
        candidates = [a for a in args if isinstance(a, type)]
        nested = [a for a in candidates if issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _recipe_key(location: tuple[Any, ...]) -> tuple[Any, ...]:
    """The recipe key of an error's location, without pydantic's union members (`constrained-int`, ...)."""
    for length in range(len(location), 0, -1):
        if location[length - 1] in _fields_at(location[: length - 1]):
            named = tuple(map(str, location[:length])) in NAMED_ENTRIES and len(location) > length
            return location[: length + 1] if named else location[:length]  # a question's name is part of its key
    return ()


def explain_validation_error(exc: ValidationError, source: str, set_paths: list[tuple[str, ...]] = ()) -> str:
    messages = []
    by_key: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    by_set: dict[str, str] = {}
    for error in exc.errors():
        location = tuple(p for p in error["loc"] if not isinstance(p, int))
        if error["type"] == "extra_forbidden":
            key = ".".join(str(p) for p in location)
            valid = _fields_at(location[:-1])
            close = difflib.get_close_matches(str(location[-1]), valid, n=1)
            hint = f" Did you mean `{'.'.join([*map(str, location[:-1]), close[0]])}`?" if close else ""
            messages.append(
                f"`{_cut(key)}`{_from_set(location, set_paths)} is not a recipe key.{hint} "
                f"Valid keys here: {', '.join(valid) or 'none'}."
            )
            continue
        key = ".".join(str(p) for p in _recipe_key(location)) or "(top level)"
        by_set.setdefault(key, _from_set(_recipe_key(location), set_paths))
        if error["type"] == "missing":
            messages.append(f"`{key}` is required but missing; add it to the recipe.")
        elif error["type"] == "model_type" and _recipe_key(location) == location and (fields := _fields_at(location)):
            # `--set model=tiny`: a section given a value (not a question of `prompt.questions`, a name, not a key)
            messages.append(
                f"`{key}`{by_set[key]} is a section of keys ({', '.join(fields)}), not a value (got "
                f"{_short(error.get('input'))}); set one of its keys, e.g. `{key}.{fields[0]}`."
            )
        elif error["type"] == "value_error":
            message = str(error["msg"]).removeprefix("Value error, ") + by_set[key]
            messages.append(message if message.endswith((".", "?", "!")) else message + ".")
        else:  # one line per key: a union (`int | "auto"`) fails once per member
            by_key.setdefault(key, []).append(str(error["msg"]))
            inputs.setdefault(key, error.get("input"))
    for key, reasons in by_key.items():
        messages.append(f"`{key}`{by_set[key]}: {', or '.join(dict.fromkeys(reasons))} (got {_short(inputs[key])}).")
    if len(messages) > 8:
        messages = [*messages[:8], f"({len(messages) - 8} more problems)"]
    return f"Invalid recipe {_short(source)}: " + " ".join(messages) + " See README.md for every recipe key."


def frozen_recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
