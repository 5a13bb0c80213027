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

if FLAGS and os.environ.get("HOSTILE_STUCK_AFTER"):
    import annotator.preprocess

    _decode = annotator.preprocess.prepare_image

    def _stuck_after(job):
        # The first HOSTILE_STUCK_AFTER decodes (over every worker) go through; the others never return.
        for slot in range(int(os.environ["HOSTILE_STUCK_AFTER"])):
            try:
                os.close(os.open(os.path.join(FLAGS, f"slot-{slot}"), os.O_CREAT | os.O_EXCL))
                return _decode(job)
            except FileExistsError:
                continue
        _flag(f"decoding-{os.getpid()}")
        time.sleep(600)  # a decoder that never returns (and ignores SIGINT, as workers do)

    annotator.preprocess.prepare_image = _stuck_after

if FLAGS and os.environ.get("HOSTILE_SLOW_SCORE"):
    import annotator.scoring

    _launch = annotator.scoring.Scorer.launch

    def _slow_launch(self, rows):
        _flag("scoring")
        time.sleep(60)  # a long forward pass: the main thread is busy, not waiting
        return _launch(self, rows)

    annotator.scoring.Scorer.launch = _slow_launch
