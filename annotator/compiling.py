"""`model.compile`: whether the lean forward's blocks and layers run through torch.compile, and what that needs."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from pathlib import Path

from annotator.errors import AnnotatorError

# Whether `model.compile: auto` compiles: only where measured to win in a full run. On an H100 (2026-11-26,
# docs/performance.md) the regional compile ran 116 seed-sized pairs/s in steady state against 127 for the eager
# lean forward with its Triton rotary (and 115 against 112 before that kernel); on a CPU it is not the point.
COMPILE_WINS: dict[str, bool] = {"cuda": False, "cpu": False}

PROBE_TIMEOUT_S = 120  # a compiler that hangs is a broken one
OFF = "or use `model.compile: off` (same scores)."


def use_compile(setting: str, forward: str, device_type: str) -> bool:
    """Whether `model.compile` (auto, on, off) compiles the lean forward on a device of this type. `auto` never
    stops a run: where this machine cannot compile, it stays off."""
    if forward != "lean" or setting == "off":
        return False
    if setting == "on":
        return True
    return COMPILE_WINS.get(device_type, False) and toolchain_problem(device_type) is None


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def cpp_compiler() -> str:
    """The C++ compiler inductor calls on a CPU: $CXX, else its platform default (read as inductor reads it)."""
    return os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")


def c_compiler() -> str | None:
    """The C compiler Triton builds its GPU launcher with: $CC, else gcc, else clang (Triton's own order)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def inductor_cache() -> Path:
    """The folder PyTorch's compiler writes (and loads) its kernels in: $TORCHINDUCTOR_CACHE_DIR or its default."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if folder is not None:
        return Path(os.path.abspath(folder))
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return Path(os.path.abspath(default_cache_dir()))


def check_cache_folder() -> None:
    """PyTorch creates $TORCHINDUCTOR_CACHE_DIR as soon as the model's code is imported, `model.compile` on or off,
    and fails with a traceback where it cannot: a user error before anything loads instead. Creates nothing."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if folder is None:
        return
    if folder.startswith("~"):  # PyTorch takes it as written: a folder named `~` in the current one
        raise AnnotatorError(
            f"$TORCHINDUCTOR_CACHE_DIR is {folder!r}, and PyTorch does not expand `~`: it would create a folder named "
            f"'~' in the current folder ({os.getcwd()}) when the model's code loads. Write the folder out, e.g. "
            f"{os.path.expanduser(folder)} (a shell expands `~` only outside quotes), or unset it."
        )
    path = Path(os.path.abspath(folder))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path:
        why = None if path.is_dir() else "it is a file"
    elif not existing.is_dir():
        why = f"{existing} is a file"
    else:
        why = None if os.access(existing, os.W_OK | os.X_OK) else f"{existing} cannot be written"
    if why is not None:
        raise AnnotatorError(
            f"$TORCHINDUCTOR_CACHE_DIR is {path}, which PyTorch cannot use as its cache folder ({why}); it creates it "
            "when the model's code loads, whatever `model.compile` says. Point it at a folder that exists or can be "
            "created, or unset it."
        )


def check_compile(setting: str, forward: str, cuda_graphs: str, device_types: Iterable[str]) -> None:
    """`model.compile: on` needs the lean forward, no CUDA graphs of our own, and for each device type the run uses a
    toolchain that works (Triton and a C compiler on a GPU, a C++ compiler on a CPU, a writable cache folder): a
    user error before anything loads otherwise."""
    if setting != "on":
        return
    if forward != "lean":
        raise AnnotatorError(
            "`model.compile: on` compiles annotator's lean forward, but `model.forward` is transformers. Use "
            "`model.forward: lean` (the default, same scores), or `model.compile: off`."
        )
    if cuda_graphs == "on":
        raise AnnotatorError(
            "`model.compile: on` and `model.cuda_graphs: on` cannot be combined: the graphs capture the eager "
            "forward. Choose one (docs/performance.md says what each measured): `model.cuda_graphs: off` or "
            "`model.compile: off`."
        )
    for device_type in sorted(set(device_types)):
        problem = toolchain_problem(device_type)
        if problem is not None:
            raise AnnotatorError(problem)


def toolchain_problem(device_type: str) -> str | None:
    """Why torch.compile cannot build kernels for `device_type` here, as a user error message; None if it can.

    Not only whether a compiler is on PATH: one builds a small library in PyTorch's cache folder, as inductor and
    Triton will, so a compiler that fails, a wrapper that is no compiler, missing headers, or a cache folder that
    cannot be written (or, on a CPU, run from) are found now, before anything loads. Kept per compiler and folder.
    """
    if device_type == "cuda":
        if not triton_installed():
            return (
                "`model.compile: on` on a GPU needs Triton, which is not installed (PyTorch's CUDA wheels bring it: "
                "pip install triton). Install it, " + OFF
            )
        return _probe(False, c_compiler(), str(inductor_cache()))
    if device_type == "cpu":
        return _probe(True, cpp_compiler(), str(inductor_cache()))
    return None


def _probe_source(cpu: bool) -> tuple[str, str]:
    """A file name and source that use what the kernels use: OpenMP for inductor's CPU kernels (Linux), Python.h
    for Triton's launcher."""
    if not cpu:
        return "probe.c", "#include <Python.h>\nint annotator_probe(void) { return Py_IsInitialized(); }\n"
    if sys.platform.startswith("linux"):
        return "probe.cpp", '#include <omp.h>\nextern "C" int annotator_probe(void) { return omp_get_max_threads(); }\n'
    return "probe.cpp", 'extern "C" int annotator_probe(void) { return 0; }\n'


@functools.lru_cache(maxsize=16)
def _probe(cpu: bool, compiler: str | None, cache: str) -> str | None:
    if cpu:
        start = (
            "`model.compile: on` on a CPU needs a working C++ compiler with OpenMP (inductor builds kernels with it)"
        )
        install, variable = "apt-get install g++", "$CXX"
    else:
        start = (
            "`model.compile: on` on a GPU needs a working C compiler and Python's headers (Triton builds its "
            "launcher with them)"
        )
        install, variable = "apt-get install gcc python3-dev", "$CC"
    if compiler is None:
        return f"{start}, and there is none ($CC is not set, no gcc or clang on PATH). Install them ({install}), " + OFF
    if shutil.which(compiler) is None:
        where = "is not an executable file" if os.sep in compiler else "is not on this machine's PATH"
        return f"{start}, and {compiler} {where}. Install one ({install}) or set {variable}, " + OFF
    try:
        os.makedirs(cache, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(prefix="annotator-probe-", dir=cache)
    except OSError as exc:
        return (
            f"`model.compile: on` writes compiled kernels to PyTorch's cache folder {cache}, which cannot be "
            f"written ({exc.strerror or exc}). Set $TORCHINDUCTOR_CACHE_DIR to a writable folder, " + OFF
        )
    with scratch as folder:
        name, text = _probe_source(cpu)
        source, library = Path(folder) / name, Path(folder) / "probe.so"
        source.write_text(text)
        flags = ["-shared", "-fPIC", "-o", str(library)]
        if not cpu:
            flags.append(f"-I{_python_include()}")
        elif sys.platform.startswith("linux"):
            flags.append("-fopenmp")
        try:
            done = subprocess.run(
                [compiler, str(source), *flags], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"it did not finish in {PROBE_TIMEOUT_S} s" if isinstance(exc, subprocess.TimeoutExpired) else exc
            return f"{start}, and {compiler} could not be run ({why}). Fix it ({install}) or set {variable}, " + OFF
        if done.returncode != 0 or not library.exists():
            said = _first_error(done.stderr + done.stdout) or (
                f"exit status {done.returncode}" if done.returncode else "it exited without writing the library"
            )
            return (
                f"{start}, and {compiler} failed to build a test library ({said}). Fix or reinstall it ({install}) "
                f"or point {variable} at a working one, " + OFF
            )
        if cpu:
            try:
                ctypes.CDLL(str(library))
            except OSError as exc:
                return (
                    f"`model.compile: on` loads the kernels it builds from PyTorch's cache folder {cache}, and a test "
                    f"library there cannot be loaded ({exc}; a folder mounted noexec does this). Set "
                    "$TORCHINDUCTOR_CACHE_DIR to a folder programs can run from, " + OFF
                )
    return None


def _python_include() -> str:
    """Where Python.h is, as Triton looks for it (Debian's posix_local scheme read as posix_prefix)."""
    scheme = sysconfig.get_default_scheme()
    return sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]


def _first_error(output: str) -> str:
    """The compiler's first error line (else its first line), short enough for a one-paragraph message."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    chosen = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
    return chosen[:200]


def compile_failed(exc: BaseException, device: object) -> AnnotatorError:
    """A compile that failed when the model loaded (the toolchain checks passed), as a one-paragraph user error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
    return AnnotatorError(
        f"`model.compile: on` could not compile the forward on {device} ({said}). Use `model.compile: off` (same "
        "scores); `TORCHDYNAMO_VERBOSE=1` with `--set model.compile=on` shows PyTorch's full error."
    )
