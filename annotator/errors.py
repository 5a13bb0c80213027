"""The exceptions the command line turns into messages and exit codes."""

import contextlib
import errno
import os
from collections.abc import Iterator

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_RESUMABLE = 2


class AnnotatorError(Exception):
    """A user mistake (bad recipe, missing column, unreadable input): exit 1, no traceback."""

    exit_code = EXIT_USER_ERROR


class AlreadyFinished(Exception):
    """`resume` of a run that is done: nothing to do, which is success (exit 0), so that a loop that resumes until
    it succeeds ends."""

    exit_code = EXIT_OK


class RunInterrupted(Exception):
    """A run stopped early (signal, write failure) in a state `annotate resume` continues: exit 2."""

    exit_code = EXIT_RESUMABLE


# A path the system refuses by its name alone: whatever step met it first, the user's path is what is wrong.
PATH_NAME_ERRORS = {errno.ENAMETOOLONG: "it is too long", errno.ELOOP: "its symbolic links lead in a circle"}


@contextlib.contextmanager
def path_name_errors() -> Iterator[None]:
    """An error of a path's name as an `AnnotatorError` naming the path: too long, a symbolic link loop, or bytes that
    are not UTF-8 (pyarrow and text files take UTF-8 names only). Such a path fails wherever it is first used (a
    stat, an open, a folder walk, pyarrow), and no step can say more than this."""
    try:
        yield
    except OSError as exc:
        why = PATH_NAME_ERRORS.get(exc.errno)
        if why is None:
            raise
        path = os.fsdecode(exc.filename) if exc.filename is not None else "a path given"
        fix = (
            "A name in a path may have at most 255 bytes and a whole path 4,096 on most file systems: give a "
            "shorter one."
            if exc.errno == errno.ENAMETOOLONG
            else "Fix or remove the link, or give another path."
        )
        raise AnnotatorError(f"The path {_shown(path)} cannot be used: {why} ({exc.strerror}). {fix}") from None
    except UnicodeEncodeError as exc:
        if not is_undecoded(exc.object):
            raise
        raise AnnotatorError(not_utf8_message(exc.object)) from None


def is_undecoded(text: object) -> bool:
    """Whether `text` holds bytes of a name that were not UTF-8 (Python keeps them as surrogates U+DC80..U+DCFF)."""
    return isinstance(text, str) and any("\udc80" <= c <= "\udcff" for c in text)


def not_utf8_message(path: str) -> str:
    shown = _shown(path.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    return (
        f"The path {shown} holds bytes that are not UTF-8 text (shown as \ufffd), and pyarrow opens UTF-8 paths "
        "only. Use a UTF-8 name (rename it, e.g. `convmv -f latin1 -t utf8 --notest -r PATH`), then run the command "
        "again."
    )


def _shown(path: str) -> str:
    return repr(path if len(path) <= 200 else path[:100] + "..." + path[-97:])
