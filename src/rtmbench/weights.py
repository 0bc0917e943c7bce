"""Find a model's checkpoint: a local path, or a URL downloaded once into the cache.

Downloads resume (HTTP Range) after a dropped connection, show a progress bar, are verified
against the sha256 prefix OpenMMLab puts in its file names (``…-05d8511e.pth``), and are
renamed into place only when complete and verified. One process at a time fetches a file
(a lock file beside it); the others wait and use its result.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from .cache import ArtifactCache, cache_lock, file_sha256
from .errors import RtmbenchError

log = logging.getLogger(__name__)

HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")
TRANSIENT_HTTP = (408, 425, 429)  # request timeout, too early, too many requests: retried as 5xx are
RETRY_WAIT_S = 1.0  # after the first 5xx or one of those; doubled after each next one


def sha256_prefix_from_name(name: str) -> str | None:
    """The hash prefix OpenMMLab encodes in checkpoint names: ``x-05d8511e.pth`` → ``05d8511e``."""
    match = HASH_IN_NAME.search(name)
    return match.group(1) if match else None


class WrongChecksum(RtmbenchError):
    """A checkpoint whose sha256 does not start with the expected prefix."""


class FetchFailed(RtmbenchError):
    """The file could not be fetched (unreachable server, HTTP error, dropped connections)."""


def verify_sha256(path: Path, expected_prefix: str) -> None:
    actual = file_sha256(path)
    if not actual.startswith(expected_prefix.lower()):
        raise WrongChecksum(f"{path}: sha256 {actual[:16]}… does not start with the expected "
                            f"{expected_prefix}: corrupt or wrong file")


def _checked(path: Path, sha256_prefix: str | None) -> Path:
    """``path``, once its sha256 is known to start with ``sha256_prefix`` (if there is one)."""
    if sha256_prefix:
        verify_sha256(path, sha256_prefix)
    return path


def download(url: str, dest: Path, sha256_prefix: str | None, attempts: int = 5,
             timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resuming a ``dest.part`` left by a dropped connection).

    The fetch and its check hold a lock file beside ``dest``: a second process after the same
    file (a pytest-xdist worker, another CLI run) waits, then finds it verified, instead of
    appending to the same ``.part``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(dest.with_name(dest.name + ".lock")):
        if not dest.is_file():  # else another process fetched it while this one waited
            _fetch_verified(url, dest, sha256_prefix, attempts, timeout, progress)
    return dest


def _fetch_verified(url: str, dest: Path, sha256_prefix: str | None, attempts: int,
                    timeout: float, progress: bool) -> None:
    """Fetch ``url`` into ``dest.part``, retrying dropped connections; rename it to ``dest``
    once it is whole and its sha256 starts with ``sha256_prefix``."""
    part = dest.with_name(dest.name + ".part")
    unverified_said, busy_answers = bool(sha256_prefix), 0
    for attempt in range(1, attempts + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                have, total = _resumed_at(response, have)
                if not unverified_said:
                    unverified_said = True
                    log.warning("%s: no sha256 prefix in its name and none given: the download is not verified%s",
                                url, "" if total is not None else " (nor its size: the server sends none)")
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True,
                        desc=dest.name, disable=not progress, leave=False) as bar:
                    while block := response.read(1 << 16):
                        f.write(block)
                        bar.update(len(block))
                if total is not None and part.stat().st_size < total:
                    raise urllib.error.URLError("connection closed before the end of the file")
            break
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # (IncompleteRead: a chunked body cut)
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 416 and have:
                if sha256_prefix or _content_range(exc.headers)[1] == have:
                    break  # no bytes past the end of the .part: whole, or wrong and the checksum says so
                part.unlink()  # longer than the file, or its size unknown, with no checksum: start over
                if attempt == attempts:
                    raise FetchFailed(f"{url}: download failed after {attempts} attempts (the partial file "
                                      f"{part} was longer than the file on the server, and is deleted)") from None
                continue
            busy = isinstance(exc, urllib.error.HTTPError) and (exc.code >= 500 or exc.code in TRANSIENT_HTTP)
            if isinstance(exc, urllib.error.HTTPError) and not busy:
                part.unlink(missing_ok=True)
                raise FetchFailed(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (socket.gaierror, ConnectionRefusedError)):  # retrying will not help
                raise FetchFailed(f"{url}: cannot reach the server ({reason})") from None
            log.warning("download of %s interrupted (%s), attempt %d/%d", url, exc, attempt, attempts)
            if attempt == attempts:
                kept = f"; the partial file {part} is kept for resuming" if part.exists() else ""
                raise FetchFailed(f"{url}: download failed after {attempts} attempts ({exc}){kept}") from None
            if busy:  # a server asking for time gets it; a dropped connection resumes at once
                time.sleep(RETRY_WAIT_S * 2 ** busy_answers)
                busy_answers += 1
    if sha256_prefix:
        try:
            verify_sha256(part, sha256_prefix)
        except WrongChecksum as exc:
            part.unlink(missing_ok=True)
            raise WrongChecksum(f"{url}: downloaded file rejected: {exc}") from None
    os.replace(part, dest)


def _resumed_at(response, have: int) -> tuple[int, int | None]:
    """Where ``response``'s body starts in the file (``have`` for the range asked, 0 when the
    server sends the whole file instead) and the file's size, or None where the server gives none.
    A range other than the one asked is an error (appended, it would corrupt the file)."""
    length = response.headers.get("Content-Length")
    length = int(length) if length is not None else None
    if response.status != 206:
        return 0, length
    start, size = _content_range(response.headers)
    if start not in (have, 0):
        raise urllib.error.URLError(f"the server answered the range {response.headers.get('Content-Range')!r} "
                                    f"to a request for bytes {have}-")
    if size is None and length is not None:  # the file's size unknown to the server: the body's says where it ends
        size = start + length
    return start, size


def _content_range(headers) -> tuple[int | None, int | None]:
    """(first byte, file size) in a Content-Range header: ``bytes 300-999/1000``, or a 416's
    ``bytes */1000``; None for what it does not give (``…/*``: a size the server does not know)."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (headers or {}).get("Content-Range", "").strip())
    start, size = match.groups() if match else (None, "*")
    return (int(start) if start is not None else None), (int(size) if size != "*" else None)


def is_url(source: str | Path) -> bool:
    """Whether a ``--weights`` value is downloaded (http/https) rather than a local path."""
    return urlparse(str(source)).scheme in ("http", "https")


def cached_weights_path(cache_root: Path, url: str) -> Path:
    """Where the checkpoint at ``url`` is kept: ``<cache>/weights/NAME`` for a name with a sha256
    prefix (it says what it holds), else ``<cache>/weights/<hash of the URL>/NAME``: two
    ``epoch_300.pth`` at two URLs are two checkpoints (the URL without its query string, which
    for a presigned URL is a token that changes)."""
    parts = urlparse(url)
    name = Path(parts.path).name
    where = f"{parts.scheme}://{parts.netloc}{parts.path}"  # not its query: a presigned URL's token changes
    folder = cache_root / "weights"
    return (folder if sha256_prefix_from_name(name) else folder / hashlib.sha256(where.encode()).hexdigest()[:12]) / name


def resolve_weights(model: str, weights: str | None, cache: ArtifactCache,
                    sha256_prefix: str | None = None, progress: bool = True) -> Path | None:
    """The local checkpoint for ``model``: ``weights`` (path or URL).

    URLs are fetched into the cache once (:func:`cached_weights_path`); the file there,
    downloaded or put there by hand, is checked against the sha256 prefix on every use. Offline with nothing cached, the
    error says what to download and where to put it.
    """
    source = weights
    if source is None:
        raise RtmbenchError(f"no weights known for model {model}: pass --weights PATH|URL")
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise RtmbenchError(f"{path}: checkpoint file not found")
        return _checked(path, sha256_prefix)
    name = Path(urlparse(source).path).name
    if not name:
        raise RtmbenchError(f"{source}: the URL names no file (give the checkpoint's URL, ending in its file name)")
    in_name = None if sha256_prefix else sha256_prefix_from_name(name)
    sha256_prefix = sha256_prefix or in_name
    dest = cached_weights_path(cache.root, source)
    cache.make_dir(dest.parent)
    try:
        if dest.is_file():  # fetched earlier, or put there by hand as the offline error suggests
            return _checked(dest, sha256_prefix)  # a wrong one is refused but left: it may be the user's
        return download(source, dest, sha256_prefix, progress=progress)
    except FetchFailed as exc:  # not a rejected file: fetching that again by hand would not help
        raise RtmbenchError(f"{exc}. Offline? Download {source} yourself and pass --weights PATH, "
                            f"or put it at {dest}") from None
    except WrongChecksum as exc:  # a name like model-20240115.pth reads as a checksum too
        if in_name is None:
            raise
        raise RtmbenchError(f"{exc} (expected from the file name's -{in_name} suffix, OpenMMLab's "
                            "checksum convention; a file of yours: pass --weights PATH)") from None


