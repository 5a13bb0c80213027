"""Faults for the writer processes of tests/test_scaleout.py, imported at their start through PYTHONPATH.

With SCALEOUT_KILL_WINDOW=K and SCALEOUT_CAUSE=FILE, a writer that reads window K while FILE exists kills itself
with SIGKILL, as a decoder that segfaults or the kernel's out-of-memory killer would. With SCALEOUT_KILL_LOAD=1, a
writer kills itself so as it starts loading the model (a device that runs out of memory). With
SCALEOUT_WINDOW_DELAY=S, a writer takes S seconds more over each window (a slow device), so that a test can stop a
run before it ends on any machine. Without them, nothing.
"""

import os

WINDOW = os.environ.get("SCALEOUT_KILL_WINDOW")
DELAY = os.environ.get("SCALEOUT_WINDOW_DELAY")

if os.environ.get("SCALEOUT_KILL_LOAD"):
    import signal

    import annotator.writer

    def _killed_loading(self):
        os.kill(os.getpid(), signal.SIGKILL)

    annotator.writer.WindowScorer.load = _killed_loading

if WINDOW is not None:
    import signal

    import annotator.writer

    _plan = annotator.writer.WindowScorer._plan

    def _killing_plan(self, window):
        if window.index == int(WINDOW) and os.path.exists(os.environ["SCALEOUT_CAUSE"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return _plan(self, window)

    annotator.writer.WindowScorer._plan = _killing_plan

if DELAY is not None:
    import time

    import annotator.writer

    _slow_plan = annotator.writer.WindowScorer._plan

    def _delayed_plan(self, window):
        time.sleep(float(DELAY))
        return _slow_plan(self, window)

    annotator.writer.WindowScorer._plan = _delayed_plan
