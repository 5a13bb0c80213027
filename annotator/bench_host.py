"""Host figures of `annotate bench`: main-process CPU per pair, worker CPU and bytes per image, planner GIL stall.

A CPU cannot time a GPU run, but it can count what the host spends: these figures hold on any machine.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")
LAUNCH_OPS = 20  # small tensor ops between two GIL releases in the emulated scoring loop


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_usage(pids: list[int]) -> tuple[float, int]:
    """CPU seconds and bytes read plus written by syscalls (pipes) of these processes, from /proc."""
    cpu, moved = 0.0, 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        moved += int(io["rchar"]) + int(io["wchar"])
    return cpu, moved


def _host_annotator():
    from annotator.images import ImageRef
    from annotator.preprocess import ImageJob
    from annotator.run import Annotator
    from annotator.writer import WindowScorer

    class HostScorer(WindowScorer):
        """The real writer, counting its process's CPU outside the forward pass, and what its workers spend."""

        def _loop(self, lookahead) -> None:
            self.forward_cpu_s = 0.0
            self._time_forward()
            self._warm_up()
            self.pids = self.preprocessor.worker_pids()
            self.workers_before = worker_usage(self.pids)
            self.counts_before = self.preprocessor.counts.copy()
            self.cpu_before = _process_cpu_s()
            super()._loop(lookahead)
            self.main_cpu_s = _process_cpu_s() - self.cpu_before - self.forward_cpu_s
            self.workers_after = worker_usage(self.pids)
            self.counts_after = self.preprocessor.counts.copy()

        def _time_forward(self) -> None:
            """The forward pass (collate, patchify, model) runs on this thread: its CPU is left out of the figure."""
            launch = self.scorer.launch

            def timed_launch(rows):
                start = time.thread_time()
                wait = launch(rows)
                self.forward_cpu_s += time.thread_time() - start

                def timed_wait():
                    start = time.thread_time()
                    scores = wait()
                    self.forward_cpu_s += time.thread_time() - start
                    return scores

                return timed_wait

            self.scorer.launch = timed_launch

        def _warm_up(self) -> None:
            """Start every worker and let it finish importing, so that start-up is not counted per image."""
            if self.preprocessor.workers == 0:
                return
            from annotator.bench import encode, photo_like

            job = ImageJob(ImageRef(data=encode(photo_like(280, 280), "PNG")), (280, 280), 10**9)
            tickets = [self.preprocessor.submit(job) for _ in range(4 * self.preprocessor.workers)]
            for ticket in tickets:
                self.preprocessor.result(ticket)
            self.preprocessor.release(tickets)
            cpu, deadline = -1.0, time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.3)
                previous, (cpu, _) = cpu, worker_usage(self.preprocessor.worker_pids())
                if cpu == previous:
                    break

    class HostAnnotator(Annotator):
        """The real run, with its one writer in this process counting what the host spends (`HostScorer`)."""

        def _executor(self) -> Any:
            executor = super()._executor()
            executor.scorer_class = HostScorer  # one device: a writer in a thread of this process
            return executor

    return HostAnnotator


def host_run(recipe: Any, console: Any) -> dict[str, Any]:
    """One run of the real pipeline, with one torch thread so that the forward's CPU is all on the main thread."""
    import torch

    from annotator.start import prepare_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder, source = prepare_run(recipe, overwrite=True)
        annotator = _host_annotator()(recipe, folder, source, console, progress=False, fresh=True)
        summary = annotator.run()
    finally:
        torch.set_num_threads(threads)
    pairs = summary["session_rows"]
    writer = annotator.executor.writer
    counts = writer.counts_after - writer.counts_before
    images = counts["images_shared"] + counts["images_piped"]
    worker_cpu = writer.workers_after[0] - writer.workers_before[0]
    piped = writer.workers_after[1] - writer.workers_before[1]
    shared = counts["encoded_bytes_shared"] + counts["decoded_bytes_shared"]
    return {
        "pairs": pairs,
        "main_cpu_ms_per_pair": round(1000 * writer.main_cpu_s / pairs, 3) if pairs else None,
        "worker_cpu_ms_per_image": round(1000 * worker_cpu / images, 2) if images else None,
        "pipe_bytes_per_image": round(piped / images) if images else None,
        "shared_bytes_per_image": round(shared / images) if images else None,
        "images_through_shared_memory": counts["images_shared"],
    }


def measure_host(recipe: Any, tmp: Path, console: Any) -> dict[str, Any]:
    """Host figures for both ways images travel (or the main process alone without workers)."""
    from annotator.preprocess import resolve_workers

    ways = {"shared_memory": True, "pipes": False} if resolve_workers(recipe.batching.workers) else {"inline": False}
    runs = {}
    for way, shared in ways.items():
        batching = recipe.batching.model_copy(update={"shared_memory": shared})
        output = recipe.output.model_copy(update={"dir": str(tmp / f"host-{way}")})
        runs[way] = host_run(recipe.model_copy(update={"batching": batching, "output": output}), console)
    main = runs.get("shared_memory", runs.get("inline"))
    return {"main_cpu_ms_per_pair": main["main_cpu_ms_per_pair"], "host": runs}


def planner_stall(recipe: Any, builder: Any, seconds: float = 1.5) -> dict[str, Any]:
    """How much a scoring loop that launches small ops slows down while the planner plans the first window.

    The loop runs `LAUNCH_OPS` tiny tensor ops, then releases the GIL (as a wait for a worker or the GPU
    does); while the planner thread holds the GIL, getting it back takes up to the switch interval (5 ms).
    The stall is the loop time lost: planning time x (1 - rate while planning / rate alone).
    """
    import torch

    from annotator.batching import plan_recipe_window
    from annotator.sources import open_source

    window = next(open_source(recipe.input, recipe.prompt).windows(recipe.batching.window))
    x = torch.zeros(1)

    def loop_rate(until) -> float:
        count, start = 0, time.perf_counter()
        while not until(count, time.perf_counter() - start):
            for _ in range(LAUNCH_OPS):
                x.add_(1)
            time.sleep(0)
            count += 1
        return count / (time.perf_counter() - start)

    alone = loop_rate(lambda count, elapsed: elapsed >= seconds)
    done = threading.Event()
    planning = threading.Thread(target=lambda: (plan_recipe_window(window, recipe, builder), done.set()))
    start = time.perf_counter()
    planning.start()
    during = loop_rate(lambda count, elapsed: done.is_set())
    planning.join()
    took = time.perf_counter() - start
    return {
        "planner_window_rows": window.rows,
        "planner_window_s": round(took, 3),
        "planner_stall_ms_per_window": round(1000 * took * max(0.0, 1 - during / alone), 1),
    }


def worker_malloc(images: list[Any], max_pixels: int, count: int) -> dict[str, Any]:
    """Worker CPU per image with glibc's malloc defaults and tuned, through shared memory and through pipes.

    One worker decodes `count` images of the mix (after a warm-up), collected and released as a run does.
    """
    from annotator.batching import PATCH_SIZE, grid_thw
    from annotator.images import ImageRef
    from annotator.preprocess import ImageJob, Preprocessor
    from annotator.ring import shared_memory_problem

    jobs = []
    for image in images:
        _, grid_h, grid_w = grid_thw(image.height, image.width, 3136, max_pixels)
        jobs.append(ImageJob(ImageRef(data=image.data), (grid_h * PATCH_SIZE, grid_w * PATCH_SIZE), 10**9))
    figures = {}
    for way in ("shared_memory", "pipes") if shared_memory_problem() is None else ("pipes",):
        for malloc in ("tuned", "glibc_default"):
            with Preprocessor(1, 60, 16, 3 * max_pixels, way == "shared_memory", malloc == "tuned") as workers:
                _decode(workers, jobs[:8])
                pids = workers.worker_pids()
                before = worker_usage(pids)[0]
                _decode(workers, [jobs[i % len(jobs)] for i in range(count)])
                figures[f"{way}_{malloc}"] = round(1000 * (worker_usage(pids)[0] - before) / count, 2)
    return {"worker_cpu_ms_per_image_by_malloc": figures}


def _decode(workers: Any, jobs: list[Any]) -> None:
    """Keep eight images in flight, as a run keeps its lookahead."""
    tickets: list[int] = []
    for job in jobs:
        tickets.append(workers.submit(job))
        if len(tickets) == 8:
            workers.result(tickets[0])
            workers.release([tickets.pop(0)])
    for ticket in tickets:
        workers.result(ticket)
    workers.release(tickets)
