"""The command list: engine commands plus the training package's, attached lazily."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from blipsearch.retrieval.cli import main


def test_all_commands_are_listed_and_the_training_ones_resolve():
    result = CliRunner().invoke(main, ["--help"])
    listed = {line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == {"capfilt", "eval", "export", "index", "query", "serve", "status", "train", "train-lm"}
    assert "ANNOTATIONS" in CliRunner().invoke(main, ["train-lm", "--help"]).output
    assert "CONFIG" in CliRunner().invoke(main, ["train", "--help"]).output


def test_searching_never_imports_the_training_package():
    probe = ("import sys\n"
             "from blipsearch.retrieval.cli import index, main, query, status\n"
             "print(any(m.startswith('blipsearch.training') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_finished_query_skips_the_teardown_and_everything_else_exits_normally(monkeypatch):
    """`run` (the executable) ends the process at once, output flushed, only after a read-only command
    finished; an error or any other command goes through `sys.exit` as usual."""
    from blipsearch.retrieval import cli

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    flushed = []
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: None)  # pytest's own log handlers stay open
    monkeypatch.setattr(sys.stdout, "flush", lambda: flushed.append(True))

    def read_only(**_):
        cli.finished_read_only()
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_read_only_done", False)
    monkeypatch.setattr(cli, "main", read_only)
    with pytest.raises(Exited) as fast:
        cli.run()
    assert fast.value.args == (0,) and flushed

    def failing(**_):
        raise SystemExit(1)

    monkeypatch.setattr(cli, "_read_only_done", False)
    monkeypatch.setattr(cli, "main", failing)
    with pytest.raises(SystemExit) as normal:
        cli.run()
    assert normal.value.code == 1
