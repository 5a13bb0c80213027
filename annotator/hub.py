"""The Hugging Face Hub: is it reachable (answered in seconds, not after a minute of retries), and what then.

`huggingface_hub` retries a failed request five times with back-off, so an offline `from_pretrained`
takes about 50 s to fail. One probe of the endpoint (`HF_ENDPOINT`, proxies from the environment) with a
hard deadline decides instead: reachable, load as usual; unreachable, use the local cache only.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

from annotator.errors import AnnotatorError

PROBE_TIMEOUT_S = 4.0
PROBE_REUSE_S = 60.0  # one process asks several times within a run's first seconds; the answer stands
_PROBED: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when, why unreachable)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the cache only, no request at all."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub answers (any HTTP status); else why not, within `timeout_s` whatever the network does.

    The request runs on a daemon thread, so a name lookup that hangs cannot hold the caller (or its exit).
    """
    if offline():
        return "HF_HUB_OFFLINE is set"
    known = _PROBED.get(endpoint())
    if known is not None and time.monotonic() - known[0] < PROBE_REUSE_S:
        return known[1]  # a run asks before writing anything, then again as its model loads: probe once
    outcome: list[str | None] = []

    def probe() -> None:
        from huggingface_hub import get_session

        try:
            get_session().head(endpoint() + "/", timeout=timeout_s)
            outcome.append(None)
        except Exception as exc:  # DNS, refused, TLS, proxy: every way of not answering
            outcome.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    reason = outcome[0] if outcome else f"no answer within {timeout_s:g} s"
    _PROBED[endpoint()] = (time.monotonic(), reason)
    return reason


def is_hub_id(name: str) -> bool:
    """A name that can only mean a Hub repository: not a local path, `org/name` or `name` in the characters the Hub
    allows (`foo bar` or `{tiny}` is neither a folder nor an id: huggingface_hub raised a traceback for them)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).exists() or name.count("/") > 1 or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


class ModelUnavailable(AnnotatorError):
    """A Hub model that cannot be had: the Hub is unreachable and the cache lacks it.

    The command line adds the exact commands to go on (it knows what was typed).
    """

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.why = (
            "offline mode (HF_HUB_OFFLINE) is set"
            if reason == "HF_HUB_OFFLINE is set"
            else f"the Hugging Face Hub at {endpoint()} cannot be reached ({reason})"
        )
        super().__init__(
            f"Could not load model {model!r}: {self.why}, and the Hugging Face cache ({cache_dir()}) does not hold "
            "it. Behind a proxy, set HTTPS_PROXY; for a mirror, HF_ENDPOINT."
        )


def next_steps(command: list[str], can_change_model: bool) -> list[str]:
    """The commands that go on without the Hub, given the command that failed (as a list of words)."""
    import shlex

    typed = shlex.join(command)
    steps = []
    if can_change_model:
        steps.append(f"{typed} --set model.name=tiny    # the offline test model: real pipeline, meaningless scores")
    steps.append(f"HF_HUB_OFFLINE=1 {typed}    # the model from the cache (HF_HOME), once it is there")
    if can_change_model:
        steps.append(
            f"{typed} --set model.name=/path/to/Qwen2-VL-2B-Instruct    # a local model folder (config.json, "
            "weights, tokenizer), e.g. from `hf download Qwen/Qwen2-VL-2B-Instruct --local-dir DIR` elsewhere"
        )
    return steps
