"""The window queue: pull with a lease depth, lowest ids first, a dead writer's windows back with a strike, suspects
alone, the window that kills `MAX_STRIKES` writers named, a stream's end found by a writer."""

from __future__ import annotations

import itertools
import pickle

import pytest

from annotator.coordinator import MAX_STRIKES, WindowQueue, WriterFailure
from annotator.errors import AnnotatorError, RunInterrupted


def grants(queue: WindowQueue, writer: int) -> list[int]:
    """Everything `writer` may take now."""
    taken = []
    while (index := queue.grant(writer)) is not None:
        taken.append(index)
    return taken


def test_each_writer_holds_at_most_the_lease_depth_and_gets_more_as_it_commits():
    queue = WindowQueue(range(10), depth=2)
    assert grants(queue, 0) == [0, 1] and grants(queue, 1) == [2, 3]
    queue.commit(1, 2)
    assert grants(queue, 1) == [4] and grants(queue, 0) == []
    for writer, index in [(0, 0), (0, 1), (1, 3), (1, 4)]:
        queue.commit(writer, index)
    assert not queue.done
    while not queue.done:
        for writer in (0, 1):
            for index in grants(queue, writer):
                queue.commit(writer, index)
    assert queue.committed == set(range(10))


def test_a_dead_writers_windows_go_first_to_others_each_alone():
    queue = WindowQueue(range(10), depth=3)
    assert grants(queue, 0) == [0, 1, 2] and grants(queue, 1) == [3, 4, 5]
    queue.commit(0, 0)
    assert queue.writer_gone(0) == [1, 2] and queue.poisoned is None
    assert grants(queue, 2) == [1], "a suspect goes alone, lowest first"
    queue.commit(1, 3)
    assert grants(queue, 1) == [], "writer 1 holds windows: the suspect 2 waits for a writer with none"
    queue.commit(2, 1)
    assert grants(queue, 2) == [2]
    queue.commit(2, 2)
    assert grants(queue, 2) == [6, 7, 8], "no suspect left: full depth again"


def test_the_window_that_kills_max_strikes_writers_is_named_not_its_neighbours():
    queue = WindowQueue(range(6), depth=3)
    assert grants(queue, 0) == [0, 1, 2]
    queue.writer_gone(0)  # window 1 kills; 0 and 2 were only held beside it
    for writer in itertools.count(1):
        index = queue.grant(writer)
        if index == 1:
            queue.writer_gone(writer)
            if queue.poisoned is not None:
                break
        else:
            queue.commit(writer, index)
    assert queue.poisoned == 1 and queue.strikes[1] == MAX_STRIKES
    assert queue.strikes[0] == queue.strikes[2] == 1


def test_a_stream_of_unknown_length_ends_where_a_writer_found_its_end():
    queue = WindowQueue(itertools.count(), depth=2)
    assert grants(queue, 0) == [0, 1] and grants(queue, 1) == [2, 3]
    queue.commit(0, 0)
    queue.end_at(1, 3)  # window 3 is past the input: 2 was the last
    queue.end_at(1, 2)
    assert queue.end == 2 and grants(queue, 0) == [] and grants(queue, 1) == []
    assert not queue.done
    queue.commit(0, 1)
    assert queue.done


def test_a_window_committed_late_by_a_writer_thought_dead_is_not_handed_out_again():
    queue = WindowQueue(range(3), depth=3)
    assert grants(queue, 0) == [0, 1, 2]
    queue.writer_gone(0)
    queue.commit(0, 1)  # its commit event was already on its way
    assert grants(queue, 1) == [0]
    queue.commit(1, 0)
    assert grants(queue, 1) == [2]


@pytest.mark.parametrize(
    ("exc", "kind", "raised"),
    [(AnnotatorError("bad"), "user", AnnotatorError), (RunInterrupted("stop"), "interrupted", RunInterrupted)],
)
def test_a_writers_error_crosses_a_process_as_itself(exc, kind, raised):
    failure = pickle.loads(pickle.dumps(WriterFailure.of(exc)))
    assert failure.kind == kind and isinstance(failure.exception(), raised) and str(failure.exception()) == str(exc)


def test_a_crash_crosses_with_its_traceback():
    try:
        raise ValueError("codec bug")
    except ValueError as exc:
        failure = WriterFailure.of(exc)
    assert failure.kind == "crash" and failure.message == "ValueError: codec bug" and "Traceback" in failure.detail
