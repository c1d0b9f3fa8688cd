"""Whether a folder can be written, found out before anything long runs: run folders and teacher caches.

This module is torch-free.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

WRITE_TEST_PREFIX = ".write-test-"  # the probe file's name; a probe left by a killed process is a leftover


def probe_writable(folder: Path, *, create: bool = True) -> None:
    """Raise the ``OSError`` that writing a file into ``folder`` would raise.

    With ``create`` the folder (and its parents) is made first; without, nothing is created before it is needed
    and the nearest existing ancestor is probed instead (a path below a regular file is ``NotADirectoryError``).
    """
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    else:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory")
    with tempfile.NamedTemporaryFile(dir=folder, prefix=WRITE_TEST_PREFIX):
        pass
