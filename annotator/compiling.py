"""`model.compile`: whether the lean forward's blocks and layers run through torch.compile, and what that needs."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterable

from annotator.errors import AnnotatorError

# Whether `model.compile: auto` compiles: only where measured to win in a full run. A whole-forward compile ran
# the forward alone 1.41x faster on an H100 (2026-11-25, docs/performance.md); the regional compile used here has
# not yet been timed on a GPU, and on a CPU it is not the point. Until it is, auto means off.
COMPILE_WINS: dict[str, bool] = {"cuda": False, "cpu": False}


def use_compile(setting: str, forward: str, device_type: str) -> bool:
    """Whether `model.compile` (auto, on, off) compiles the lean forward on a device of this type."""
    if forward != "lean":
        return False
    return setting == "on" or (setting == "auto" and COMPILE_WINS.get(device_type, False))


def cpp_compiler() -> str | None:
    """The C++ compiler inductor calls on a CPU ($CXX, else g++), if this machine has it."""
    return shutil.which(os.environ.get("CXX") or "g++")


def check_compile(setting: str, forward: str, cuda_graphs: str, device_types: Iterable[str]) -> None:
    """`model.compile: on` needs the lean forward, no CUDA graphs of our own, and a compiler for each device type
    the run uses (Triton on a GPU, a C++ compiler on a CPU): a user error before anything loads otherwise."""
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
        if device_type == "cuda" and importlib.util.find_spec("triton") is None:
            raise AnnotatorError(
                "`model.compile: on` on a GPU needs Triton, which is not installed (PyTorch's CUDA wheels bring "
                "it: pip install triton). Install it, or use `model.compile: off`."
            )
        if device_type == "cpu" and cpp_compiler() is None:
            raise AnnotatorError(
                f"`model.compile: on` on a CPU needs a C++ compiler ({os.environ.get('CXX') or 'g++'}), which is "
                "not on this machine's PATH. Install one (apt-get install g++) or set $CXX, or use "
                "`model.compile: off`."
            )
