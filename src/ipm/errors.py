"""Typed errors. Every failure a user can cause or fix is one of these, with a message that
says what went wrong and what to do; the CLI prints the message on one line and exits 1."""


class IPMError(Exception):
    """Base class of all errors ipm raises on purpose."""


class InvalidInput(IPMError):
    """The caller gave something malformed (text, ID, file record, option)."""


class InvalidID(InvalidInput):
    """A memory ID does not follow the `domain_topic_entity` rules."""


class DuplicateID(InvalidInput):
    """A memory ID is already taken in this namespace."""


class NotFound(IPMError):
    """The memory (or index, or file) asked for does not exist."""


class ModelError(IPMError):
    """The base model is missing, cannot be loaded, or does not match the index."""


class IndexMissing(IPMError):
    """No trained index exists yet for this namespace."""


class IndexDamaged(IPMError):
    """An index version on disk cannot be read or rewritten."""


class TrainingError(IPMError):
    """Training could not run (nothing to train on, interrupted, ...)."""


class TrainingInProgress(TrainingError):
    """Another training of the namespace is under way (in this process or another)."""


class IPMWarning(UserWarning):
    """Something a user should know that does not stop the work (an index calibrated under
    other settings, a file that could not be deleted); the CLI prints it on one line."""


class HomeError(IPMError):
    """The home directory or its database cannot be used (not a directory, not an IPM store)."""


def environment_error_message(e: BaseException, with_path: bool = True) -> str | None:
    """What to tell a user of an error that is the machine's, not ipm's nor the input's: the file
    system's answer (permission denied, disk full) or SQLite's (a disk that fails, another
    process's lock). None for any other error, a defect, whose traceback is for us. The CLI, the
    HTTP server and the MCP server say these the same way; `with_path=False` leaves out the
    file's path (the HTTP server's clients need not learn the server's directories)."""
    import sqlite3

    if isinstance(e, sqlite3.OperationalError):
        from .store import store_error_message

        return store_error_message(e, "the store")
    if isinstance(e, OSError):
        return (e.strerror or str(e)) + (f": {e.filename}" if e.filename and with_path else "")
    return None
