"""Errors a user can fix and the exit codes of the whole program: the ground floor every module may import.

    UsageError   bad command line or input: one line for the user, exit 2, nothing written
    DataError    bad data or data flags: one line for the user, exit 2
"""

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED_EARLY, EXIT_ABORTED = 0, 1, 2, 75, 130


class UsageError(Exception):
    """Bad command line or input: one line for the user, exit 2, nothing written."""


class DataError(Exception):
    """Bad data or data flags: one line for the user, exit 2."""
