"""Atomic file writes: readers see either nothing or the whole file, never a partial one."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only if the block succeeds.
    A file replaced keeps its mode; a symlink is written through to its target, as open() does."""
    final = Path(final)
    if final.is_symlink():
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = final.parent / f".{final.name}.{secrets.token_hex(8)}.part"
    # Created as open() creates files (0666 less the umask: 0644 for most users), not with
    # mkstemp's 0600, so a results folder shared between users stays readable. O_EXCL: never
    # anyone else's file.
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp_path
        with contextlib.suppress(FileNotFoundError):  # (a new file: open()'s mode above)
            os.chmod(tmp_path, stat.S_IMODE(final.stat().st_mode))
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
