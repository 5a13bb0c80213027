"""The exceptions the command line turns into messages and exit codes."""

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_RESUMABLE = 2


class AnnotatorError(Exception):
    """A user mistake (bad recipe, missing column, unreadable input): exit 1, no traceback."""

    exit_code = EXIT_USER_ERROR


class RunInterrupted(Exception):
    """A run stopped early (signal, write failure) in a state `annotate resume` continues: exit 2."""

    exit_code = EXIT_RESUMABLE
