"""Running the `blipsearch` command in tests: in-process (click's runner) or in a fresh process."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from blipsearch.retrieval.cli import main

CLI = [sys.executable, "-m", "blipsearch.retrieval.cli"]


def blipsearch(*args, index, expect=0):
    """Run the command in-process against the index folder `index`; check its exit status."""
    device = ["--device", "cpu"] if args[0] in ("index", "query") else []
    result = CliRunner().invoke(main, [*args, "--index", str(index), *device])
    assert result.exit_code == expect, (result.output, result.stderr)
    return result


SCORES = ("score", "itc", "itm_prob")


def assert_same_results(ours: list[dict], printed: list[dict]) -> None:
    """Results as JSON (`Result.to_json`) alike: the same fields, scores within 2e-6. The CLI's text query runs
    the numpy text side, an index opened with its vision tower torch's: their fp32 sums differ in the last bits,
    so a score printed to 6 decimals may differ by one in the last."""
    assert [{k: v for k, v in r.items() if k not in SCORES} for r in ours] == \
        [{k: v for k, v in r.items() if k not in SCORES} for r in printed]
    for mine, theirs in zip(ours, printed, strict=True):
        assert all((mine[k] is None) == (theirs[k] is None) and (mine[k] is None or abs(mine[k] - theirs[k]) <= 2e-6)
                   for k in SCORES), (mine, theirs)


def one_line_error(result, *fragments: str) -> str:
    """The single stderr line of a failed command, checked to hold each fragment and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blipsearch: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """A fresh `blipsearch` process."""
    return subprocess.run([*CLI, *args], capture_output=True, timeout=timeout, **kwargs)


def photo_library(root, model_dir, folders: dict[str, int], extra=None):
    """`root/photos/<name>` folders of `count` random pictures each (seeds 1, 2, ...), `extra(root)` for any
    other files, all indexed with `model_dir` into `root/index`; returns `root`."""
    from photos import make_folder

    for seed, (name, count) in enumerate(folders.items(), 1):
        make_folder(root / "photos" / name, count, seed=seed)
    if extra is not None:
        extra(root)
    blipsearch("index", str(root / "photos"), "--model", str(model_dir), "-q", index=root / "index")
    return root
