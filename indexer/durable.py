"""Writes that survive a power loss: a renamed file is fsynced first, and its folder after the rename.

Without this, a file system may put the rename on disk before the file's bytes (XFS, ext4 without its
rename heuristic), and a crash then leaves an empty manifest where a good one was.
"""

from __future__ import annotations

import os
from pathlib import Path


def sync(path: Path) -> None:
    """fsync a file, or a folder's entries (where the platform lets folders be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # Windows cannot open folders; nothing to sync there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(tmp: Path, target: Path) -> None:
    """Move the fully written `tmp` (a file, or a folder of files) over `target`, durably."""
    for path in ([tmp] if tmp.is_file() else [*(p for p in tmp.iterdir() if p.is_file()), tmp]):
        sync(path)
    tmp.replace(target)
    sync(target.parent)
