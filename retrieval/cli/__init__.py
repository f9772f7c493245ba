"""The `blipsearch` command. Each subcommand lives in its own module of this package.

Library code raises typed exceptions (`blipsearch.retrieval.errors`); only here do they become one-line
messages and exit codes:

    0  done
    1  error (bad index, model, file or argument); one line on stderr says what to do
    2  usage error (unknown option, missing argument)
    3  done, but some files were skipped (each one named on stderr with the reason)
    130 interrupted (Ctrl-C); work already written stays in the index
    141 the output pipe was closed (e.g. `| head -1`); nothing is printed
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys

import click

from ..device import keep_freed_memory
from ..errors import BlipsearchError, one_line

EXIT_ERROR = 1
EXIT_SKIPPED = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as for a process the closed pipe ended
EXIT_TERMINATED = 143  # 128 + SIGTERM
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a write that a full device or quota refused


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a service manager, a job scheduler), raised in the main thread by the `blipsearch`
    executable: a command stops as on Ctrl-C and its clean-up runs (eval's temporary features, gigabytes on
    COCO, were left behind when the signal ended the process outright)."""


def _terminated(signum, frame) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM, during the clean-up, ends the process
    raise Terminated


# Commands of the optional training package, imported only when named (module, attribute).
TRAINING_COMMANDS = {name: ("blipsearch.training.cli", f"{name.replace('-', '_')}_command")
                     for name in ("train", "capfilt", "export", "train-lm")}


class Group(click.Group):
    """Turns library exceptions into one line on stderr and an exit status; never a traceback.

    The training package's commands attach lazily: the engine never imports it to search.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *TRAINING_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in TRAINING_COMMANDS and name not in self.commands:
            import importlib

            module, attribute = TRAINING_COMMANDS[name]
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BlipsearchError as exc:
            click.echo(f"blipsearch: error: {one_line(str(exc))}", err=True)
            sys.exit(EXIT_ERROR)
        except BrokenPipeError:  # the reader went away (`| head -1`): stop quietly, as `cat` would
            _silence_stdout()
            sys.exit(EXIT_BROKEN_PIPE)
        except OSError as exc:  # a write refused for want of space (`> /dev/full`, a full disk or quota): one line
            if exc.errno not in _FULL:
                raise
            _silence_stdout()
            where = f" writing {exc.filename}" if exc.filename else ""  # none: the output, or a file of a run
            click.echo(f"blipsearch: error: {exc.strerror}{where}; free some space, or send the output elsewhere",
                       err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt as exc:
            kept = "; finished batches are kept in the index" if ctx.invoked_subcommand == "index" else ""
            stopped = "terminated" if isinstance(exc, Terminated) else "interrupted"
            click.echo(f"blipsearch: {stopped}{kept}", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log lines on stderr (-vv for debug).")
@click.version_option(package_name="blipsearch")
def main(verbose: int) -> None:
    """Search your images with words, using BLIP's image-text retrieval."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_OneLine("blipsearch: %(message)s"))
    _quiet_third_party()
    keep_freed_memory()  # large activations reuse freed memory instead of faulting in fresh pages


class _OneLine(logging.Formatter):
    """Each log line stays one line: control characters in its message (a file name's) are escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


_read_only_done = False  # set by a read-only command that finished: see `run`


def finished_read_only() -> None:
    """Called at the end of a read-only command (`query`): nothing is left to write, so `run` may
    end the process without the interpreter's teardown."""
    global _read_only_done
    _read_only_done = True


def run() -> None:
    """The `blipsearch` executable: `main`, and after a read-only command an exit as soon as stdout and
    stderr are flushed. The interpreter's teardown (the finalizers of torch, FAISS and LanceDB objects and
    thread pools) took 0.4 s after a demo query had printed its answer at 1.27 s; the shell waited for it.
    Any other command, and a query that failed before its end, exits the ordinary way."""
    import os
    import signal

    global _read_only_done
    _read_only_done = False
    # stop as on Ctrl-C (`serve`'s uvicorn puts its own in place; `index --ray`'s `ray.init` too)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        main(prog_name="blipsearch")
        code = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # after the command's own handling (its teardown): no traceback
        code = EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)  # an embedding program (a test) gets its own back
    if not _read_only_done or not isinstance(code, int | None):
        sys.exit(code)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away after the last write
        code = EXIT_BROKEN_PIPE
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code or 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second BrokenPipeError."""
    import os

    with contextlib.suppress(OSError, ValueError):  # no real file descriptor (an embedding, a test runner)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _quiet_third_party() -> None:
    """transformers' own progress bars and hints are noise on our stderr."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LANCEDB_LOG", "error")  # its WARN lines ("No existing dataset ... will be created")
    if sys.platform == "darwin":  # torch and faiss each bring libomp; macOS aborts on the second one
        os.environ.setdefault("KMP_DUPLICATE_LIB_OK", "TRUE")


def _register() -> None:
    from . import evaluate, index, query, serve, status  # noqa: F401  (each module adds its command to `main`)


_register()
