"""The shared-memory ring: slots and the circular area for encoded bytes never overlap and never lose a byte."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from annotator.ring import ImageRing, shared_memory_problem

pytestmark = pytest.mark.skipif(shared_memory_problem() is not None, reason="no memfd_create here")


def test_slots_hold_images_until_freed_and_the_last_freed_is_reused_first():
    ring = ImageRing(slots=3, slot_bytes=5000, encoded_bytes=4096)
    try:
        assert ring.take_slot(ring.slot_bytes + 1) is None, "an image larger than a slot goes through the pipe"
        taken = [ring.take_slot(4000) for _ in range(3)]
        assert sorted(taken) == [0, 1, 2] and ring.take_slot(10) is None
        images = []
        for slot in taken:
            view = ring.image(slot, (20, 50, 4))
            view[...] = slot + 1
            images.append(view)
        for slot, view in zip(taken, images, strict=True):
            assert (view == slot + 1).all(), "slots do not overlap"
        ring.free_slot(taken[1])
        assert ring.take_slot(10) == taken[1]
    finally:
        images = view = None
        ring.close()


def test_encoded_bytes_wrap_around_and_come_back_intact():
    rng = random.Random(3)
    ring = ImageRing(slots=1, slot_bytes=4096, encoded_bytes=8192)
    live: list[tuple[tuple[int, int], bytes]] = []
    placed = refused = 0
    try:
        for _ in range(3000):
            if live and (rng.random() < 0.45 or len(live) > 6):
                (offset, size), data = live.pop(0)
                assert ring.memory[offset : offset + size].tobytes() == data, "bytes were overwritten"
                ring.free_encoded(offset, size)
                continue
            data = rng.randbytes(rng.choice([1, 7, 300, 1500, 4000, 8192, 8193]))
            span = ring.put_encoded(memoryview(data))
            if span is None:
                refused += 1
                assert len(data) > 8192 or live, "an empty area takes anything that fits in it"
                continue
            placed += 1
            offset, size = span
            assert size == len(data) and ring.encoded_start <= offset and offset + size <= ring.size
            live.append((span, data))
        assert placed > 1000 and refused > 50
        assert ring.put_encoded(b"") is None
    finally:
        ring.close()


def test_encoded_bytes_must_be_freed_oldest_first():
    ring = ImageRing(slots=1, slot_bytes=4096, encoded_bytes=4096)
    try:
        first, second = ring.put_encoded(b"a" * 10), ring.put_encoded(b"b" * 10)
        with pytest.raises(RuntimeError, match="out of order"):
            ring.free_encoded(*second)
        ring.free_encoded(*first)
        ring.free_encoded(*second)
    finally:
        ring.close()


def test_close_unmaps_the_ring():
    ring = ImageRing(slots=2, slot_bytes=4096, encoded_bytes=4096)
    name = ring.name
    assert name in Path("/proc/self/maps").read_text()
    ring.close()
    assert name not in Path("/proc/self/maps").read_text()
