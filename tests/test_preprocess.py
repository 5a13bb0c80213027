"""Worker processes: same images as in-process decoding, through shared memory or pipes; a hung or crashing decoder
costs only its own row; no worker and no shared memory outlives a run, however it ends."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from annotator.images import ImageRef, image_kind
from annotator.preprocess import ImageJob, Preprocessor, prepare_image
from annotator.ring import shared_memory_problem

LIMIT = 100_000_000


@dataclass(frozen=True, slots=True)
class MisbehavingRef(ImageRef):
    """An image whose decoding misbehaves, in a worker process only (never in the test process itself).

    Defined at module level so that spawned workers can unpickle it by importing this module.
    """

    action: str = "hang"
    pid_file: str | None = None

    def stream(self) -> BinaryIO:
        if multiprocessing.parent_process() is not None:
            if self.action == "slow" and self.pid_file and Path(self.pid_file).exists():
                return ImageRef.stream(self)  # tried again after its worker was killed: innocent, it decodes
            if self.pid_file:
                Path(self.pid_file).write_text(str(os.getpid()))
            if self.action == "hang":
                time.sleep(3600)
            elif self.action == "segfault":  # what a crashing codec does
                os.kill(os.getpid(), signal.SIGSEGV)
            elif self.action == "exit":
                os._exit(3)
            elif self.action == "interrupt":  # what Ctrl-C in the terminal does to every process of the run
                os.kill(os.getpid(), signal.SIGINT)
            elif self.action == "slow":  # an innocent image that takes until the test has killed its worker
                time.sleep(30)
        return ImageRef.stream(self)


def photo(seed: int, size: tuple[int, int] = (96, 64), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def good_job(seed: int, size: tuple[int, int] = (96, 64)) -> ImageJob:
    return ImageJob(ImageRef(data=photo(seed, size)), (56, 84), LIMIT)


def bad_job(action: str, pid_file: str | None = None) -> ImageJob:
    return ImageJob(MisbehavingRef(data=photo(99), action=action, pid_file=pid_file), (56, 84), LIMIT)


def run_all(preprocessor: Preprocessor, jobs: list[ImageJob]) -> list:
    """Results of `jobs` submitted as a run does (in chunks), copied out of shared memory, slots then freed."""
    tickets = preprocessor.submit_batch(jobs)
    results = [r if isinstance(r, str) else r.copy() for r in map(preprocessor.result, tickets)]
    preprocessor.release(tickets)
    return results


# Both ways images travel between the run and its workers: keyword arguments of `Preprocessor`.
TRANSPORTS = {"shared memory": {"slots": 6, "slot_bytes": 56 * 84 * 3}, "pipes": {}}


@pytest.fixture(params=list(TRANSPORTS))
def transport(request) -> dict:
    if request.param == "shared memory" and shared_memory_problem() is not None:
        pytest.skip(shared_memory_problem())
    return TRANSPORTS[request.param]


def assert_ring_is_empty(preprocessor: Preprocessor) -> None:
    """Every slot and every encoded byte of the ring was given back."""
    if preprocessor.ring is not None:
        assert preprocessor.ring.free_slots == preprocessor.ring.slots
        assert not preprocessor.ring._encoded


def assert_good(result, job: ImageJob) -> None:
    assert not isinstance(result, str), result
    np.testing.assert_array_equal(result, prepare_image(job))


def test_workers_give_the_same_results_as_the_main_process():
    jobs = [good_job(i, (40 + 30 * i, 90)) for i in range(5)] + [ImageJob(ImageRef(data=b"<html>"), (56, 56), LIMIT)]
    with Preprocessor(0, timeout_s=60) as inline, Preprocessor(2, timeout_s=60) as pool:
        expected, got = run_all(inline, jobs), run_all(pool, jobs)
    for a, b in zip(expected[:-1], got[:-1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert image_kind(got[-1]) == image_kind(expected[-1]) == "decode: not an image"
    assert pool.restarts == 0


def test_a_hung_decoder_costs_its_row_a_timeout_and_the_run_goes_on(transport):
    jobs = [good_job(0), bad_job("hang"), good_job(1), good_job(2), good_job(3)]
    with Preprocessor(2, timeout_s=4, **transport) as preprocessor:
        started = time.perf_counter()
        results = run_all(preprocessor, jobs)
        assert time.perf_counter() - started < 60, "the hung decode (an hour) was given up"
        assert results[1] == "decode: timeout (over 4s)"
        for result, job in zip(results, jobs, strict=True):
            if job.ref.__class__ is ImageRef:
                assert_good(result, job)
        later = good_job(4)
        assert_good(run_all(preprocessor, [later])[0], later)  # the replaced pool works
        assert preprocessor.restarts >= 1
        assert_ring_is_empty(preprocessor)


def test_a_crashing_worker_costs_only_its_rows(transport):
    # Slow enough innocent jobs are in flight in the other worker when a crash breaks the whole pool.
    jobs = [good_job(0, (400, 300)), bad_job("segfault"), good_job(1, (400, 300)), bad_job("exit"), good_job(2)]
    with Preprocessor(2, timeout_s=60, **transport) as preprocessor:
        results = run_all(preprocessor, jobs)
        restarts = preprocessor.restarts
        assert_ring_is_empty(preprocessor)
    for result, job in zip(results, jobs, strict=True):
        if isinstance(job.ref, MisbehavingRef):
            assert image_kind(result) == "decode: worker crashed", result
        else:
            assert_good(result, job)
    assert restarts >= 2


def test_jobs_submitted_to_a_broken_pool_still_run(transport):
    with Preprocessor(1, timeout_s=60, **transport) as preprocessor:
        crash = preprocessor.submit(bad_job("exit"))
        # Once the pool has failed the crashed job, it is broken; no `result` has noticed it yet.
        wait_for(lambda: preprocessor._pending[crash][1].future.done(), "the pool to break")
        later = [good_job(i) for i in range(3)]
        tickets = [preprocessor.submit(job) for job in later]
        assert image_kind(preprocessor.result(crash)) == "decode: worker crashed"
        for ticket, job in zip(tickets, later, strict=True):
            assert_good(preprocessor.result(ticket), job)


def test_workers_ignore_ctrl_c_so_the_main_process_decides_how_to_stop():
    job = bad_job("interrupt")
    with Preprocessor(1, timeout_s=60) as preprocessor:
        [result] = run_all(preprocessor, [job])
    assert_good(result, job)


def test_close_kills_a_hung_worker(tmp_path):
    pid_file = tmp_path / "pid"
    preprocessor = Preprocessor(1, timeout_s=60)
    preprocessor.submit(bad_job("hang", str(pid_file)))
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the worker to start the job")
    pid = int(pid_file.read_text())
    started = time.perf_counter()
    preprocessor.close()
    assert time.perf_counter() - started < 5
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(pid), "a hung worker left behind would keep the interpreter from exiting"


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_shared_memory_gives_the_same_images_as_pipes_and_the_main_process(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(photo(7, (120, 80)))
    jobs = [good_job(i, (40 + 30 * i, 90)) for i in range(5)]
    jobs += [
        ImageJob(ImageRef(data=memoryview(photo(5, (90, 60)))), (56, 84), LIMIT),  # a view of Arrow's buffer
        ImageJob(ImageRef(path=str(path)), (56, 84), LIMIT),
        ImageJob(ImageRef(data=photo(6, (300, 200))), (112, 168), LIMIT),  # decoded, larger than a slot
        ImageJob(ImageRef(data=b"<html>"), (56, 56), LIMIT),
        ImageJob(ImageRef(data=photo(8, (400, 400))), (28, 28), LIMIT),  # encoded, larger than the ring's area
    ]
    jobs += [good_job(10 + i) for i in range(8)]  # more images than slots: the rest go through pipes
    shared = {"slots": 4, "slot_bytes": 56 * 84 * 3}
    with Preprocessor(0, 60) as inline, Preprocessor(2, 60, shared_memory=False, **shared) as piped:
        expected, through_pipes = run_all(inline, jobs), run_all(piped, jobs)
    with Preprocessor(2, 60, **shared) as preprocessor:
        preprocessor.ring.encoded_bytes = 200_000  # what `photo(8)`'s 480 kB does not fit in
        tickets = [preprocessor.submit(job) for job in jobs]
        through_ring = [preprocessor.result(t) for t in tickets]
        assert preprocessor.ring.free_slots == 0, "every slot is held until released"
        in_ring = [not isinstance(r, str) and np.shares_memory(r, preprocessor.ring.memory) for r in through_ring]
        through_ring = [r if isinstance(r, str) else r.copy() for r in through_ring]
        preprocessor.release(tickets)
        assert_ring_is_empty(preprocessor)
        counts = preprocessor.counts
    assert piped.ring is None and piped.counts["images_shared"] == 0
    assert sum(in_ring) == 4 and counts["images_shared"] == 4 and counts["images_piped"] == len(jobs) - 4
    assert counts["encoded_bytes_piped"] >= len(photo(8, (400, 400))) and counts["encoded_bytes_shared"] > 0
    for a, b, c in zip(expected, through_pipes, through_ring, strict=True):
        if isinstance(a, str):
            assert image_kind(a) == image_kind(b) == image_kind(c)
        else:
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


def test_a_worker_killed_mid_decode_costs_nothing_but_a_retry(tmp_path, transport):
    """Killed from outside (the OOM killer, a user): its image is decoded again, alone; every row is right."""
    pid_file = tmp_path / "pid"
    slow = ImageJob(MisbehavingRef(data=photo(42), action="slow", pid_file=str(pid_file)), (56, 84), LIMIT)
    jobs = [good_job(0, (400, 300)), good_job(1), slow, good_job(2, (400, 300)), good_job(3), good_job(4)]
    with Preprocessor(2, timeout_s=60, **transport) as preprocessor:
        tickets = [preprocessor.submit(job) for job in jobs]
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the worker to start the slow job")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # mid-decode: the job waits for it
        results = [r if isinstance(r, str) else r.copy() for r in map(preprocessor.result, tickets)]
        preprocessor.release(tickets)
        assert preprocessor.restarts >= 1
        assert_ring_is_empty(preprocessor)
    for result, job in zip(results, jobs, strict=True):
        assert_good(result, job)


def run_recipe_counting(recipe_path: Path, monkeypatch) -> tuple[list, Counter]:
    """Run a recipe in this process; its probabilities and how its images travelled."""
    from annotator.run import run_recipe
    from tests.conftest import read_output

    counts: Counter = Counter()
    close = Preprocessor.close

    def counting_close(self: Preprocessor) -> None:
        counts.update(self.counts)
        counts.update({"ring:" + self.ring.name: 1} if self.ring is not None else {})
        close(self)

    monkeypatch.setattr(Preprocessor, "close", counting_close)
    run_recipe(str(recipe_path), [], overwrite=False, console=Console(quiet=True), progress=False)
    return read_output(yaml_output(recipe_path)).column("prob").to_pylist(), counts


def yaml_output(recipe_path: Path) -> Path:
    import yaml

    return Path(yaml.safe_load(recipe_path.read_text())["output"]["dir"])


@pytest.mark.skipif(shared_memory_problem() is not None, reason="no memfd_create here")
def test_a_run_through_shared_memory_gives_the_same_probabilities_as_pipes_and_no_workers(
    tmp_path, mixed_parquet, monkeypatch
):
    from tests.conftest import write_recipe

    probs = {}
    for name, batching in {
        "shared": {"workers": 2},
        "pipes": {"workers": 2, "shared_memory": False},
        "inline": {"workers": 0},
    }.items():
        recipe = write_recipe(tmp_path / f"{name}.yaml", mixed_parquet, tmp_path / name, batching=batching)
        probs[name], counts = run_recipe_counting(recipe, monkeypatch)
        if name == "shared":
            assert counts["images_shared"] == 16 and counts["images_piped"] == 0
            (ring,) = [key.removeprefix("ring:") for key in counts if key.startswith("ring:")]
        if name == "pipes":
            assert counts["images_shared"] == 0 and counts["images_piped"] == 16
    assert None not in probs["shared"]
    assert probs["shared"] == probs["pipes"] == probs["inline"]
    assert ring not in Path("/proc/self/maps").read_text(), "the run unmapped its ring"


def ring_holders(prefix: str) -> set[int]:
    """Every process that maps, or holds a descriptor of, a shared-memory ring whose name starts with `prefix`."""
    holders = set()
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            if prefix in (process / "maps").read_text() or any(
                prefix in os.readlink(fd) for fd in (process / "fd").iterdir()
            ):
                holders.add(int(process.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return holders


@pytest.mark.slow
@pytest.mark.skipif(shared_memory_problem() is not None, reason="no memfd_create here")
@pytest.mark.parametrize(("ending", "exit_code"), [("finished", 0), ("ctrl-c", 2), ("kill -9", -signal.SIGKILL)])
def test_no_worker_and_no_shared_memory_outlive_a_run(tmp_path, ending, exit_code, monkeypatch):
    from annotator.ring import NAME_PREFIX
    from tests.conftest import Pause, jpeg_bytes, write_dataset, write_recipe

    rows = 48
    images = [jpeg_bytes(320, 240, seed=i) for i in range(rows)]
    dataset = write_dataset(tmp_path / "in.parquet", images, [f"caption {i}" for i in range(rows)])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        dataset,
        tmp_path / "out",
        model={"max_pixels": 28 * 28 * 64},
        batching={"window": 8, "max_batch_size": 4, "workers": 2},
    )
    command = [sys.executable, "-c", "from annotator.cli import main; main()", "run", str(recipe), "--no-progress"]
    # The writer waits before committing window 1 (its workers decoding the next windows' images) until the test has
    # seen them and ended the run its way: a run cannot end before, however fast the machine.
    pause = Pause(monkeypatch, tmp_path, window=1).hold()
    # A session of its own: Ctrl-C in a terminal signals the whole process group, workers included.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    prefix = f"{NAME_PREFIX}-{process.pid}-"
    try:
        pause.writer(process)
        wait_for(lambda: len(ring_holders(prefix)) >= 3 or process.poll() is not None, "the workers", timeout=120)
        holders = ring_holders(prefix)
        assert process.pid in holders and len(holders) == 3, "the run and its two workers map the ring"
        if ending == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        elif ending == "kill -9":
            process.kill()
    finally:
        pause.release()  # the finished run goes on to its end; a stopped one is past the pause already
    out, _ = process.communicate(timeout=180)
    assert process.returncode == exit_code, out
    deadline = time.monotonic() + 20
    while (ring_holders(prefix) or any(running(pid) for pid in holders)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in holders), "every worker died with the run"
    assert not ring_holders(prefix), "nothing maps the ring: the kernel has freed it"
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(NAME_PREFIX)]
