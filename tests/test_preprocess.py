"""Worker processes: same images as in-process decoding; a hung or crashing decoder costs only its own row."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from annotator.images import ImageRef, image_kind
from annotator.preprocess import ImageJob, Preprocessor, prepare_image

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
    tickets = [preprocessor.submit(job) for job in jobs]
    return [preprocessor.result(t) for t in tickets]


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


def test_a_hung_decoder_costs_its_row_a_timeout_and_the_run_goes_on():
    jobs = [good_job(0), bad_job("hang"), good_job(1), good_job(2), good_job(3)]
    with Preprocessor(2, timeout_s=4) as preprocessor:
        started = time.perf_counter()
        results = run_all(preprocessor, jobs)
        assert time.perf_counter() - started < 20
        assert results[1] == "decode: timeout (over 4s)"
        for result, job in zip(results, jobs, strict=True):
            if job.ref.__class__ is ImageRef:
                assert_good(result, job)
        later = good_job(4)
        assert_good(run_all(preprocessor, [later])[0], later)  # the replaced pool works
        assert preprocessor.restarts >= 1


def test_a_crashing_worker_costs_only_its_rows():
    # Slow enough innocent jobs are in flight in the other worker when a crash breaks the whole pool.
    jobs = [good_job(0, (400, 300)), bad_job("segfault"), good_job(1, (400, 300)), bad_job("exit"), good_job(2)]
    with Preprocessor(2, timeout_s=60) as preprocessor:
        results = run_all(preprocessor, jobs)
        restarts = preprocessor.restarts
    for result, job in zip(results, jobs, strict=True):
        if isinstance(job.ref, MisbehavingRef):
            assert image_kind(result) == "decode: worker crashed", result
        else:
            assert_good(result, job)
    assert restarts >= 2


def test_jobs_submitted_to_a_broken_pool_still_run():
    with Preprocessor(1, timeout_s=60) as preprocessor:
        crash = preprocessor.submit(bad_job("exit"))
        time.sleep(1.5)  # the pool is broken by now, but no `result` has noticed it yet
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
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    started = time.perf_counter()
    preprocessor.close()
    assert time.perf_counter() - started < 5
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(pid), "a hung worker left behind would keep the interpreter from exiting"


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
