"""Content-addressed artifact cache (ONNX exports, engines, downloaded weights).

Each artifact lives in ``<root>/<kind>/<key>/`` where ``key`` hashes everything it was made
from; ``manifest.json`` beside it records those inputs and the build time and is written last,
so an entry without a manifest is incomplete and never loaded. Builds run under a file lock
(one builder across processes and pytest-xdist workers) into a temporary file renamed into place.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

from .errors import RtmbenchError
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


@functools.cache
def source_digest(*modules: str) -> str:
    """A digest of the source of ``modules`` (dotted names; a package: its ``.py`` files), for
    the keys of the artifacts that code makes: a change to the exporter or to a builder makes
    them anew, as a new SDK version does. Read, not imported."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin)
        for path in sorted(origin.parent.glob("*.py")) if spec.submodule_search_locations else [origin]:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def artifact_digest(path: Path) -> dict:
    """``size_bytes`` and ``sha256`` of an artifact: a file, or a folder (its files' relative
    names and contents, in name order)."""
    if path.is_file():
        return {"size_bytes": path.stat().st_size, "sha256": file_sha256(path)}
    digest, size = hashlib.sha256(), 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
        size += f.stat().st_size
    return {"size_bytes": size, "sha256": digest.hexdigest()}


def _damage(artifact: Path, manifest: Path) -> str | None:
    """Why a complete entry must not be loaded: an unreadable manifest, or an artifact whose size
    or sha256 is not what the manifest recorded at build. None when it is intact."""
    try:
        record = json.loads(manifest.read_text())
        recorded = {"size_bytes": record["size_bytes"], "sha256": record["sha256"]}
    except ValueError:
        return f"{manifest.name} is not valid JSON"
    except (KeyError, TypeError):
        return f"{manifest.name} records no size and sha256 (built by an older rtmbench)"
    actual = artifact_digest(artifact)
    if actual["size_bytes"] != recorded["size_bytes"]:
        return f"{actual['size_bytes']} bytes, {recorded['size_bytes']} when built (truncated or altered)"
    if actual["sha256"] != recorded["sha256"]:
        return "its sha256 differs from the one recorded when it was built (altered)"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


WRITABLE_CACHE = "; pass --cache-dir or set RTMBENCH_CACHE_DIR to a writable folder"


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold the file lock ``path`` (in the cache; created if missing). A cache that cannot hold
    it (read-only, not a folder) is one error line, not the OSError of opening the file."""
    lock = FileLock(str(path))
    try:
        lock.acquire()
    except OSError as exc:
        raise RtmbenchError(f"{path}: cannot lock in the cache ({exc.strerror}){WRITABLE_CACHE}") from None
    try:
        yield
    finally:
        lock.release()


class ArtifactCache:
    """Get-or-build of artifacts keyed by their inputs. ``built`` lists what this instance built."""

    def __init__(self, root: str | Path | None = None, rebuild: bool = False, run: str | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        if self.root.exists() and not self.root.is_dir():
            raise RtmbenchError(f"{self.root}: the cache dir is not a folder")
        self.rebuild = rebuild
        # With rebuild, each entry is rebuilt once per run: the processes of one run (pytest-xdist
        # workers) share its id, and an entry another one rebuilt in this run is loaded.
        self.run = run or secrets.token_hex(8)
        self.built: list[Path] = []
        self._rebuilt: set[Path] = set()

    def make_dir(self, path: Path) -> Path:
        """Create ``path`` (a folder in the cache) and its parents; an unwritable cache is one error line."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RtmbenchError(f"{path}: cannot create a folder in the cache ({exc.strerror})"
                                f"{WRITABLE_CACHE}") from None
        return path

    def entry_dir(self, kind: str, inputs: dict, filename: str) -> Path:
        # the file name too: two names for one artifact (one graph under two model names) are two
        # entries, not one whose manifest names the other file
        return self.root / kind / hash_inputs({"inputs": inputs, "file": filename})[:24]

    def get_or_build(self, kind: str, inputs: dict, filename: str,
                     build: Callable[[Path], None]) -> Path:
        """Return ``<entry>/filename``, calling ``build(tmp_path)`` first if it is not cached.

        ``build`` writes the artifact (a file or a directory) to the path it is given; it is renamed into place and the
        manifest written only after ``build`` returns. With ``rebuild`` set, each entry is rebuilt
        once per run (see ``run``).
        """
        entry = self.entry_dir(kind, inputs, filename)
        artifact, manifest = entry / filename, entry / "manifest.json"
        force = self.rebuild and entry not in self._rebuilt
        if not force and self._loadable(artifact, manifest):
            return artifact
        self.make_dir(entry.parent)
        with cache_lock(Path(str(entry) + ".lock")):
            if force and self._built_in(manifest, self.run):  # another process of this run rebuilt it
                force = False
                self._rebuilt.add(entry)
            if not force and self._loadable(artifact, manifest, warn=True):
                return artifact  # another process built it while we waited
            self.make_dir(entry)
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
                record = {"kind": kind, "file": filename, "inputs": inputs, "built_at": start, "run": self.run,
                          "build_seconds": round(time.time() - start, 3), "pid": os.getpid(),
                          **artifact_digest(artifact)}
                write_bytes_atomic(manifest, json.dumps(record, indent=2, default=str).encode())
            except BaseException as exc:
                _remove(tmp)
                _remove(artifact)  # without its manifest (a full disk, Ctrl-C while hashing) it is never loaded
                with contextlib.suppress(OSError):  # a failed first build: no empty entry left
                    entry.rmdir()
                if isinstance(exc, OSError):  # a full disk, a file gone: one line, not a traceback
                    why = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else exc.strerror or exc
                    raise RtmbenchError(f"{artifact}: not built ({why})") from exc
                raise
        log.info("built %s %s in %.1f s", kind, artifact, record["build_seconds"])
        self.built.append(artifact)
        self._rebuilt.add(entry)
        return artifact

    @staticmethod
    def _built_in(manifest: Path, run: str) -> bool:
        """Whether the entry's build was made by a process of ``run``."""
        try:
            return json.loads(manifest.read_text()).get("run") == run
        except (OSError, ValueError, AttributeError):
            return False

    @staticmethod
    def _loadable(artifact: Path, manifest: Path, warn: bool = False) -> bool:
        """Whether the entry is complete (manifest and artifact present) and intact; with
        ``warn``, a damaged one is logged (it is then rebuilt)."""
        if not (manifest.is_file() and artifact.exists()):
            return False
        try:
            damage = _damage(artifact, manifest)
        except FileNotFoundError:  # another process started rebuilding it just now
            return False
        if damage is not None and warn:
            log.warning("%s: %s; rebuilding it", artifact, damage)
        return damage is None

    def entries(self) -> list[dict]:
        """Manifests of every complete entry, with ``path`` and ``size_bytes`` added."""
        rows = []
        for manifest in sorted(self.root.glob("*/*/manifest.json")):
            try:
                record = json.loads(manifest.read_text())
                artifact_name = record["file"]
            except FileNotFoundError:  # being rebuilt
                continue
            except (ValueError, KeyError, TypeError):
                log.warning("%s: not a valid manifest; the entry is rebuilt when next needed", manifest)
                continue
            artifact = manifest.parent / artifact_name
            if not artifact.exists():  # being rebuilt
                continue
            files = [artifact] if artifact.is_file() else [p for p in artifact.rglob("*") if p.is_file()]
            try:
                size = sum(p.stat().st_size for p in files)
            except FileNotFoundError:  # being rebuilt since it was listed
                continue
            rows.append({**record, "path": str(artifact), "size_bytes": size})
        return rows

    def clear(self) -> None:
        """Delete every entry: the folder's contents (it may be a link to a bigger disk)."""
        for path in self.root.iterdir() if self.root.is_dir() else ():
            _remove(path)
