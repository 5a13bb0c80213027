"""Shared memory between a run and its preprocessing workers: encoded images out, decoded images back, no pipes.

One anonymous shared-memory file (Linux `memfd_create`) holds fixed-size slots for decoded images and a
circular area for encoded bytes on their way to a worker. It has no name in /dev/shm, so nothing is left
behind however the run ends (kill -9 included): the kernel frees it with the last process that maps it, and
workers die with the main process. Its size does not depend on /dev/shm's (64 MiB in a default container).
Workers receive the file descriptor when they are spawned; only slot numbers and offsets go through pipes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections import deque

import numpy as np

PAGE = 4096
NAME_PREFIX = "annotator-ring"  # + pid and a random part: how /proc/*/maps names the mapping


def _round_up(size: int, unit: int = PAGE) -> int:
    return -(-size // unit) * unit


class ImageRing:
    """`slots` slots of `slot_bytes` for decoded images, then `encoded_bytes` for encoded ones (oldest freed first)."""

    def __init__(self, slots: int, slot_bytes: int, encoded_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = _round_up(slot_bytes)
        self.encoded_start = slots * self.slot_bytes
        self.encoded_bytes = _round_up(encoded_bytes)
        self.size = self.encoded_start + self.encoded_bytes
        self.name = f"{NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
        self.fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)  # sparse: pages are allocated as they are first written
            self._map = mmap.mmap(self.fd, self.size)
        except OSError:
            os.close(self.fd)
            raise
        self.memory = np.frombuffer(self._map, np.uint8)
        # A stack: the slot freed last is reused first, so a run touches only as many slots as it keeps in use.
        self._free = list(range(slots - 1, -1, -1))
        self._encoded: deque[tuple[int, int]] = deque()  # (start, end) in the encoded area, oldest first

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take_slot(self, nbytes: int) -> int | None:
        """A free slot for a decoded image of `nbytes`, or None (too large, or every slot in use)."""
        if nbytes > self.slot_bytes or not self._free:
            return None
        return self._free.pop()

    def free_slot(self, slot: int) -> None:
        self._free.append(slot)

    def image(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """The decoded image in `slot`: a view, valid until the slot is freed."""
        start = slot * self.slot_bytes
        return self.memory[start : start + int(np.prod(shape))].reshape(shape)

    def put_encoded(self, data: bytes | memoryview) -> tuple[int, int] | None:
        """Copy encoded bytes into the circular area; their (offset, length), or None when they do not fit now."""
        size = len(data)
        start = self._place(size)
        if start is None:
            return None
        self._encoded.append((start, start + size))
        offset = self.encoded_start + start
        self.memory[offset : offset + size] = np.frombuffer(data, np.uint8)
        return offset, size

    def _place(self, size: int) -> int | None:
        if size == 0 or size > self.encoded_bytes:
            return None
        if not self._encoded:
            return 0
        oldest, newest = self._encoded[0][0], self._encoded[-1][1]
        if newest > oldest:  # the bytes in use run from oldest to newest: free space at the end, then at the start
            if size <= self.encoded_bytes - newest:
                return newest
            return 0 if size <= oldest else None
        return newest if newest + size <= oldest else None  # wrapped: the free space lies between them

    def free_encoded(self, offset: int, size: int) -> None:
        """Free the oldest encoded bytes still held, which must be these: they are freed in the order they came."""
        start = offset - self.encoded_start
        if self._encoded[0] != (start, start + size):
            raise RuntimeError("encoded bytes are freed out of order")
        self._encoded.popleft()

    def reset(self) -> None:
        """Forget every slot and encoded span in use (their workers are gone)."""
        self._free = list(range(self.slots - 1, -1, -1))
        self._encoded.clear()

    def handle(self) -> RingHandle:
        return RingHandle(self.fd, self.size, self.slot_bytes)

    def close(self) -> None:
        self.memory = None
        with contextlib.suppress(BufferError):  # an image view is still referenced: the mapping ends with the process
            self._map.close()
        os.close(self.fd)


class RingHandle:
    """What a spawned worker needs to map the ring: pickled, it passes the file descriptor to the child."""

    def __init__(self, fd: int, size: int, slot_bytes: int) -> None:
        self.fd = fd
        self.size = size
        self.slot_bytes = slot_bytes

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        # Pickled while a worker is spawned: the descriptor goes to the child (same number) with the process.
        return _mapped, (DupFd(self.fd), self.size, self.slot_bytes)


class MappedRing:
    """A worker's view of the ring."""

    def __init__(self, fd: int, size: int, slot_bytes: int) -> None:
        self._map = mmap.mmap(fd, size)
        os.close(fd)  # the mapping keeps the memory
        self.memory = np.frombuffer(self._map, np.uint8)
        self.slot_bytes = slot_bytes

    def encoded(self, offset: int, size: int) -> memoryview:
        return memoryview(self._map)[offset : offset + size]

    def write_image(self, slot: int, image: np.ndarray) -> bool:
        """Copy a decoded image into `slot`; False if it does not fit."""
        if image.nbytes > self.slot_bytes:
            return False
        start = slot * self.slot_bytes
        self.memory[start : start + image.nbytes] = image.reshape(-1)
        return True


def _mapped(duplicated, size: int, slot_bytes: int) -> MappedRing:
    return MappedRing(duplicated.detach(), size, slot_bytes)


def shared_memory_problem() -> str | None:
    """Why a ring cannot be used here, or None."""
    if not hasattr(os, "memfd_create"):
        return "this system has no memfd_create (Linux only)"
    try:
        fd = os.memfd_create(f"{NAME_PREFIX}-probe", os.MFD_CLOEXEC)
    except OSError as exc:
        return f"memfd_create failed ({exc.strerror or exc})"
    os.close(fd)
    return None
