"""Hooks for the `annotate` subprocesses of tests/test_hostile.py, imported at start-up through PYTHONPATH.

They make a slow step slow on purpose, and leave a flag file when it begins, so a test can send a signal
at that moment. Without the environment variables they do nothing.
"""

import os
import time

FLAGS = os.environ.get("HOSTILE_FLAGS")


def _flag(name: str) -> None:
    with open(os.path.join(FLAGS, name), "w"):
        pass


if FLAGS and os.environ.get("HOSTILE_SLOW_LOAD"):
    import annotator.models

    def _slow_load(*args, **kwargs):
        _flag("loading")
        time.sleep(120)
        raise AssertionError("the signal should have stopped the load")

    annotator.models.load_model = _slow_load

if FLAGS and os.environ.get("HOSTILE_SLOW_DECODE"):
    import annotator.preprocess

    def _stuck_decode(job):
        _flag(f"decoding-{os.getpid()}")
        time.sleep(600)  # a decoder that never returns (ignores SIGINT, as workers do)

    annotator.preprocess.prepare_image = _stuck_decode
