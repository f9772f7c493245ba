"""The command list: engine commands plus the training package's, attached lazily."""

import subprocess
import sys

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
