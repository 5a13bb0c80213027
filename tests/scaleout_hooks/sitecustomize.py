"""Faults and pauses for the writers of `annotate` processes under test, imported at their start through PYTHONPATH.

Whatever runs a `WindowScorer` (a thread of the `annotate` process, a writer process, a Ray actor) gets them; the
scale-out, resume, Hugging Face and preprocessing tests start their subprocesses with this folder first on PYTHONPATH.

With SCALEOUT_KILL_WINDOW=K and SCALEOUT_CAUSE=FILE, a writer that reads window K while FILE exists kills itself
with SIGKILL, as a decoder that segfaults or the kernel's out-of-memory killer would. With SCALEOUT_KILL_LOAD=1, a
writer kills itself so as it starts loading the model (a device that runs out of memory). With
SCALEOUT_WINDOW_DELAY=S, a writer takes S seconds more over each window (a slow device), so that a test can stop a
run before it ends on any machine. With SCALEOUT_PAUSE=FILE and SCALEOUT_PAUSE_WINDOW=K, a writer about to commit
window K waits while FILE exists, having written its pid to FILE.pid (the first writer there does): the run cannot
end, nor pass that commit, before the test has acted (killed that writer, signalled the run, looked at its
processes) and removed FILE; a stop ends the wait, and the commit under way completes, as a real one would. Without
them, nothing.
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

PAUSE = os.environ.get("SCALEOUT_PAUSE")

if PAUSE is not None:
    import time

    import annotator.writer

    _unpaused_commit = annotator.writer.WindowScorer._commit

    def _say_who_paused() -> None:
        own = f"{PAUSE}.{os.getpid()}.tmp"
        with open(own, "w") as file:
            file.write(str(os.getpid()))
        try:
            os.link(own, f"{PAUSE}.pid")  # whole from the instant it exists; the first writer paused only
        except FileExistsError:
            pass
        finally:
            os.unlink(own)

    def _paused_commit(self, state):
        if state.window.index == int(os.environ["SCALEOUT_PAUSE_WINDOW"]) and os.path.exists(PAUSE):
            _say_who_paused()
            while os.path.exists(PAUSE) and not self.stopping.is_set():
                time.sleep(0.01)
        return _unpaused_commit(self, state)

    annotator.writer.WindowScorer._commit = _paused_commit
