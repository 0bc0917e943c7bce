"""Content-addressed artifact cache (ONNX exports, engines, downloaded weights).

Each artifact lives in ``<root>/<kind>/<key>/`` where ``key`` hashes everything it was made
from; ``manifest.json`` beside it records those inputs and the build time and is written last,
so an entry without a manifest is incomplete and never loaded. Builds run under a file lock
(one builder across processes and pytest-xdist workers) into a temporary file renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from .fsutil import write_bytes_atomic

log = logging.getLogger(__name__)

CACHE_ENV = "RTMBENCH_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$RTMBENCH_CACHE_DIR``, else the user cache dir (e.g. ``~/.cache/rtmbench``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("rtmbench"))


def hash_inputs(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class ArtifactCache:
    """Get-or-build of artifacts keyed by their inputs. ``built`` lists what this instance built."""

    def __init__(self, root: str | Path | None = None, rebuild: bool = False):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.rebuild = rebuild
        self.built: list[Path] = []
        self._rebuilt: set[Path] = set()

    def entry_dir(self, kind: str, inputs: dict) -> Path:
        return self.root / kind / hash_inputs(inputs)[:24]

    def get_or_build(self, kind: str, inputs: dict, filename: str,
                     build: Callable[[Path], None]) -> Path:
        """Return ``<entry>/filename``, calling ``build(tmp_path)`` first if it is not cached.

        ``build`` writes the artifact (a file or a directory) to the path it is given; it is renamed into place and the
        manifest written only after ``build`` returns. With ``rebuild`` set, each entry is rebuilt
        once per cache instance.
        """
        entry = self.entry_dir(kind, inputs)
        artifact, manifest = entry / filename, entry / "manifest.json"
        force = self.rebuild and entry not in self._rebuilt
        if not force and manifest.is_file() and artifact.exists():
            return artifact
        entry.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            if not force and manifest.is_file() and artifact.exists():
                return artifact  # another process built it while we waited
            manifest.unlink(missing_ok=True)  # callers from now on wait for this build
            for stale in entry.glob(".*.part"):  # left by a killed build
                _remove(stale)
            tmp = entry / f".{filename}.{os.getpid()}.part"
            start = time.time()
            try:
                build(tmp)
                # A rebuilt file replaces the old one in one rename, so a caller that found the
                # entry complete just before still finds a whole artifact at its path.
                if tmp.is_dir() or artifact.is_dir():
                    _remove(artifact)  # os.replace cannot replace a directory
                os.replace(tmp, artifact)
            finally:
                _remove(tmp)
            record = {"kind": kind, "file": filename, "inputs": inputs, "built_at": start,
                      "build_seconds": round(time.time() - start, 3), "pid": os.getpid()}
            write_bytes_atomic(manifest, json.dumps(record, indent=2, default=str).encode())
        log.info("built %s %s in %.1f s", kind, artifact, record["build_seconds"])
        self.built.append(artifact)
        self._rebuilt.add(entry)
        return artifact

    def entries(self) -> list[dict]:
        """Manifests of every complete entry, with ``path`` and ``size_bytes`` added."""
        rows = []
        for manifest in sorted(self.root.glob("*/*/manifest.json")):
            try:
                record = json.loads(manifest.read_text())
            except FileNotFoundError:  # being rebuilt
                continue
            artifact = manifest.parent / record["file"]
            files = [artifact] if artifact.is_file() else [p for p in artifact.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            rows.append({**record, "path": str(artifact), "size_bytes": size})
        return rows

    def clear(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
