"""Process settings for speed (`retrieval/device.py`)."""

import platform
import resource
import subprocess
import sys

import pytest

# Faults taken by allocating and filling a 64 MB tensor once others like it were freed: by default, then once
# `keep_freed_memory` has run (glibc keeps ~10 such holes before it reuses one: aligned requests do not fit the
# first freed ones exactly, so the warm-up is 20 rounds).
PROBE = """
import ctypes, resource, sys, torch
from blipsearch.retrieval.device import keep_freed_memory

ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KB pages, where huge pages are on by default

def faults_of_a_fresh_tensor():
    for _ in range(20):
        torch.ones(16 * 2**20).fill_(2.0)  # made and freed: its memory goes back to the OS, or stays
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).fill_(3.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_a_fresh_tensor()
kept = keep_freed_memory()
print(default, kept, faults_of_a_fresh_tensor())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    default, kept, after = run.stdout.split()
    pages = 64 * 2**20 // resource.getpagesize()  # 16,384 of 4 KB
    assert kept == "True", run.stderr
    assert int(default) > pages // 2, run.stdout  # each page faulted in again by default
    assert int(after) < pages // 32, run.stdout


def test_a_query_process_asks_numpy_for_no_huge_pages(tmp_path):
    """A fresh query's unpacked feature maps stalled 100-220 ms at random on huge-page compaction
    (`small_pages_for_a_short_run`); the query command turns numpy's advice off, other processes keep it."""
    probe = f"""
try:
    from numpy._core import multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray
from blipsearch.retrieval.cli import main
before = multiarray._get_madvise_hugepage()
try:
    main(["query", "a red circle", "--index", {str(tmp_path / "none")!r}], standalone_mode=False)
except (Exception, SystemExit):
    pass  # no index there: the setting is made before the index is opened
print(before, multiarray._get_madvise_hugepage())
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["True", "False"], run.stderr
