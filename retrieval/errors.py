"""Typed exceptions of the library. Only the CLI turns them into one-line messages and exit codes."""


class BlipsearchError(Exception):
    """Base class: the message is one line a user can act on."""


class ModelLoadError(BlipsearchError):
    """A checkpoint cannot be found, downloaded or used for retrieval."""


class StoreError(BlipsearchError):
    """The index on disk is missing, unreadable or locked."""


class IndexMissingError(StoreError):
    """No index exists at the given location."""


class IndexDamagedError(StoreError):
    """The index on disk is damaged or incomplete; the message says how to rebuild it."""


class IndexLockedError(StoreError):
    """Another process is writing to the index."""


class ModelMismatchError(StoreError):
    """The index was built with another model (or preprocessing) than the one asked for."""


class InvalidInputError(BlipsearchError):
    """An argument (path, option value, query) cannot be used."""


class FieldError(InvalidInputError):
    """A bad value of one named option; the message reads `<field> <what is wrong>`. The library names its
    fields (`top`, `min_prob`, `under`...); the CLI and the server map them to their flags and parameters."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.field, self.problem = name, problem


class ImageLoadError(BlipsearchError):
    """One image file cannot be decoded; the message names the reason, the caller names the file."""


def is_utf8(text: str) -> bool:
    """False where `text` holds lone surrogates: bytes of another encoding (argv, a path) or JSON's "\\ud800"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with the bytes a file system or command line gave that are not UTF-8 shown as \\xNN escapes."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        data = text.encode("utf-8", "backslashreplace")
    return data.decode("utf-8", "backslashreplace")


# control characters (C0, DEL, C1) as escapes: \n, \r, \t, else \xNN
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | \
    {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def one_line(text: str) -> str:
    """`printable(text)` with control characters escaped (`\\n`, `\\x1b`): a file name in a message on a
    terminal can neither split it into two lines (or fake one) nor send escape sequences."""
    return printable(text).translate(_ESCAPES)


def first_line(exc: BaseException) -> str:
    """The first line of the exception's message (its type name when the message is empty)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
