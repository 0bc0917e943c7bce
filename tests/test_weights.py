"""Weights download against a real HTTP server on 127.0.0.1: checksum, resume, offline errors."""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

from rtmbench.cache import ArtifactCache
from rtmbench.errors import RtmbenchError
from rtmbench.weights import FetchFailed, cached_weights_path, download, resolve_weights, sha256_prefix_from_name

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PREFIX = hashlib.sha256(PAYLOAD).hexdigest()[:8]


class Server:
    """Serves PAYLOAD (reversed under /other/) with Range support; ``drop_after`` cuts the first
    response short (``chunked``: a chunked one), ``chunk_delay`` slows every response (seconds
    between its 64 KiB chunks), ``range_shift`` answers a range starting that many bytes off, ``busy`` scripts the first
    requests' answers (an error status, or None to serve)."""

    def __init__(self):
        self.drop_after: int | None = None
        self.chunked = False
        self.range_shift = 0
        self.chunk_delay = 0.0
        self.busy: list[int | None] = []  # per request while it lasts: an error status, or None to serve
        self.requests: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                if self.path.startswith("/missing"):
                    self.send_error(404)
                    return
                if server.busy and (status := server.busy.pop(0)) is not None:
                    self.send_error(status)
                    return
                payload = PAYLOAD[::-1] if self.path.startswith("/other/") else PAYLOAD
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                if start >= len(payload):  # as real servers answer a range past the end
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(payload)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = max(0, start - server.range_shift) if start else 0
                body = payload[start:]
                self.send_response(206 if self.headers.get("Range") else 200)
                if self.headers.get("Range"):
                    self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
                if server.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_after is not None:
                    cut, server.drop_after = server.drop_after, None
                    head = body[:cut]
                    self.wfile.write(f"{len(head):x}\r\n".encode() + head + b"\r\n" if server.chunked else head)
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-file
                    return
                if server.chunked:
                    self.wfile.write(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
                    return
                for offset in range(0, len(body), 1 << 16):
                    self.wfile.write(body[offset:offset + (1 << 16)])
                    time.sleep(server.chunk_delay)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name):
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def test_download_verifies_checksum_from_the_name_and_caches(tmp_path, server):
    cache = ArtifactCache(tmp_path)
    path = resolve_weights("m", server.url(f"nano-{PREFIX}.pth"), cache, progress=False)
    assert path.read_bytes() == PAYLOAD and path.parent == tmp_path / "weights"
    assert resolve_weights("m", server.url(f"nano-{PREFIX}.pth"), cache, progress=False) == path
    assert len(server.requests) == 1  # the second call used the cache


def test_wrong_checksum_is_rejected_and_nothing_is_left(tmp_path, server):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(RtmbenchError, match=r"does not start with the expected deadbeef") as info:
        resolve_weights("m", server.url("nano-deadbeef.pth"), cache, progress=False)
    assert "\n" not in str(info.value) and "Offline?" not in str(info.value)  # fetching it again would not help
    assert str(info.value).endswith("(expected from the file name's -deadbeef suffix, OpenMMLab's checksum "
                                    "convention; a file of yours: pass --weights PATH)")
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["nano-deadbeef.pth.lock"]  # empty, reusable


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_dropped_connection_resumes_with_a_range_request(tmp_path, server, chunked):
    server.drop_after, server.chunked = 300_000, chunked  # chunked: http.client's IncompleteRead
    path = resolve_weights("m", server.url(f"x-{PREFIX}.pth"), ArtifactCache(tmp_path), progress=False)
    assert path.read_bytes() == PAYLOAD
    first, resumed = server.requests
    # from what was written: all 300,000 bytes, or (chunked) the whole blocks read before the cut
    assert first is None and resumed.startswith("bytes=") and resumed.endswith("-")
    assert int(resumed[6:-1]) == 300_000 if not chunked else 0 < int(resumed[6:-1]) <= 300_000


def test_a_busy_server_is_given_time_and_the_partial_file_kept(tmp_path, server, monkeypatch, caplog):
    """A dropped connection resumes at once; 429 and 503 are retried after a wait that doubles
    from 1 s, the .part kept; a 404 is final (test_unreachable_or_missing...)."""
    waits = []
    monkeypatch.setattr("rtmbench.weights.time", types.SimpleNamespace(sleep=waits.append))
    server.drop_after, server.busy = 300_000, [None, 429, 503]
    path = resolve_weights("m", server.url(f"x-{PREFIX}.pth"), ArtifactCache(tmp_path), progress=False)
    assert path.read_bytes() == PAYLOAD and waits == [1.0, 2.0]
    assert server.requests == [None] + ["bytes=300000-"] * 3
    server.busy = [503]  # the first answer an error: the unverified download is still said, once
    with caplog.at_level(logging.WARNING, logger="rtmbench.weights"):
        resolve_weights("m", server.url("plain.pth"), ArtifactCache(tmp_path), progress=False)
    assert sum("the download is not verified" in r.getMessage() for r in caplog.records) == 1


def test_only_a_wrong_checksum_is_blamed_on_the_names_suffix(tmp_path, server, monkeypatch):
    def cannot_lock(path):
        raise RtmbenchError(f"{path}: cannot lock in the cache (Read-only file system)")

    monkeypatch.setattr("rtmbench.weights.cache_lock", cannot_lock)
    with pytest.raises(RtmbenchError, match=r"cannot lock in the cache \(Read-only file system\)$"):
        resolve_weights("m", server.url(f"x-{PREFIX}.pth"), ArtifactCache(tmp_path), progress=False)


def test_a_presigned_urls_changing_token_finds_the_same_file(tmp_path):
    first, second = (cached_weights_path(tmp_path, f"https://bucket.example/run1/epoch_300.pth?token={t}")
                     for t in ("a1", "b2"))
    assert first == second != cached_weights_path(tmp_path, "https://bucket.example/run2/epoch_300.pth")


def test_a_range_answered_from_elsewhere_is_never_appended(tmp_path, server):
    """A 206 from the file's start is written from the start; one from another offset is retried,
    then refused, never appended to the .part."""
    server.drop_after, server.range_shift = 300_000, 300_000
    path = resolve_weights("m", server.url(f"x-{PREFIX}.pth"), ArtifactCache(tmp_path), progress=False)
    assert path.read_bytes() == PAYLOAD and server.requests == [None, "bytes=300000-"]
    server.drop_after, server.range_shift = 300_000, 1000
    with pytest.raises(RtmbenchError, match=r"after 2 attempts \(<urlopen error the server answered the range "
                                            r"'bytes 299000-1048575/1048576' to a request for bytes 300000-"):
        download(server.url("y.pth"), tmp_path / "y.pth", None, attempts=2, progress=False)
    assert (tmp_path / "y.pth.part").read_bytes() == PAYLOAD[:300_000]


def test_weights_of_one_name_at_two_urls_are_two_checkpoints(tmp_path, server, caplog):
    """A name without a sha256 prefix (epoch_300.pth) says nothing of what it holds: each URL
    gets its own file, and the unverified download is said."""
    cache = ArtifactCache(tmp_path)
    urls = [server.url("run1/epoch_300.pth"), server.url("other/epoch_300.pth")]
    with caplog.at_level(logging.WARNING, logger="rtmbench.weights"):
        first, second = (resolve_weights("m", url, cache, progress=False) for url in urls)
        assert resolve_weights("m", urls[0], cache, progress=False) == first  # from the cache: no warning
    assert first != second and first.read_bytes() == PAYLOAD and second.read_bytes() == PAYLOAD[::-1]
    assert first.name == second.name == "epoch_300.pth" and first.parent.parent == tmp_path / "weights"
    assert [r.getMessage() for r in caplog.records] == [
        f"{url}: no sha256 prefix in its name and none given: the download is not verified" for url in urls]


def test_a_file_put_in_the_cache_by_hand_is_checked_too(tmp_path, server):
    """The offline error says to put the file at its cache path; a wrong one there is refused,
    naming it, and left for the user to replace (it may be theirs)."""
    cache = ArtifactCache(tmp_path)
    dest = tmp_path / "weights" / f"x-{PREFIX}.pth"
    dest.parent.mkdir()
    dest.write_bytes(PAYLOAD[:1000])
    with pytest.raises(RtmbenchError, match=rf"does not start with the expected {PREFIX}") as info:
        resolve_weights("m", server.url(dest.name), cache, progress=False)
    assert str(info.value).startswith(f"{dest}: sha256") and "\n" not in str(info.value)
    assert dest.read_bytes() == PAYLOAD[:1000]
    dest.write_bytes(PAYLOAD)
    assert resolve_weights("m", server.url(dest.name), cache, progress=False) == dest
    assert server.requests == []


def test_concurrent_downloads_of_one_url_fetch_it_once(tmp_path, server):
    """Two workers after the same URL at once: the second waits for the first's lock and finds
    the verified file, instead of appending to the same .part."""
    server.chunk_delay = 0.02  # 16 chunks: the first download takes 0.3 s, so the two overlap
    url = server.url(f"x-{PREFIX}.pth")

    def fetch(_):
        return resolve_weights("m", url, ArtifactCache(tmp_path), progress=False)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(fetch, range(2))
    assert first == second and first.read_bytes() == PAYLOAD
    assert server.requests == [None]


def write_part(cache_root, url, content):
    dest = cached_weights_path(cache_root, url)
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(content)
    return part


def test_a_complete_part_file_answered_416_is_verified_and_kept(tmp_path, server):
    """A .part that is already whole (the process died before the rename) gets HTTP 416 for its
    range: it is checked and renamed into place, not requested again and again."""
    write_part(tmp_path, server.url(f"x-{PREFIX}.pth"), PAYLOAD)
    path = resolve_weights("m", server.url(f"x-{PREFIX}.pth"), ArtifactCache(tmp_path), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [f"bytes={len(PAYLOAD)}-"]


def test_a_416_with_no_checksum_keeps_a_part_only_of_the_files_size(tmp_path, server):
    """With no sha256 prefix to check, the size the 416 gives decides: a .part longer than the
    file is fetched again, one of its size is kept."""
    write_part(tmp_path, server.url("plain.pth"), PAYLOAD + b"junk")
    path = resolve_weights("m", server.url("plain.pth"), ArtifactCache(tmp_path), progress=False)
    assert path.read_bytes() == PAYLOAD and server.requests == [f"bytes={len(PAYLOAD) + 4}-", None]
    server.requests.clear()
    write_part(tmp_path / "again", server.url("plain.pth"), PAYLOAD)
    path = resolve_weights("m", server.url("plain.pth"), ArtifactCache(tmp_path / "again"), progress=False)
    assert path.read_bytes() == PAYLOAD and server.requests == [f"bytes={len(PAYLOAD)}-"]


def test_a_416_on_the_last_attempt_is_one_error_and_leaves_nothing(tmp_path, server):
    part = write_part(tmp_path, server.url("plain.pth"), PAYLOAD + b"junk")
    with pytest.raises(FetchFailed, match=r"after 1 attempts \(the partial file .*plain\.pth\.part was longer"):
        download(server.url("plain.pth"), part.with_suffix(""), None, attempts=1, progress=False)
    assert not part.exists() and not part.with_suffix("").exists()


def test_a_url_that_names_no_file_is_refused(tmp_path):
    with pytest.raises(RtmbenchError, match=r"^https://example\.com/: the URL names no file"):
        resolve_weights("m", "https://example.com/", ArtifactCache(tmp_path), progress=False)
    assert not (tmp_path / "weights").exists()


def test_a_wrong_part_file_answered_416_is_rejected_and_deleted(tmp_path, server):
    part = write_part(tmp_path, server.url(f"x-{PREFIX}.pth"), PAYLOAD[::-1])
    with pytest.raises(RtmbenchError, match=rf"does not start with the expected {PREFIX}") as info:
        resolve_weights("m", server.url(f"x-{PREFIX}.pth"), ArtifactCache(tmp_path), progress=False)
    assert "\n" not in str(info.value)
    assert not part.exists() and len(server.requests) == 1


def test_unreachable_or_missing_says_what_to_download_and_where(tmp_path, server, refused_port):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(RtmbenchError, match=r"HTTP 404.*Download .*missing-0123abcd\.pth.*put it at"):
        resolve_weights("m", server.url("missing-0123abcd.pth"), cache, progress=False)
    with pytest.raises(RtmbenchError, match="cannot reach the server.*Offline\\? Download"):
        resolve_weights("m", f"http://127.0.0.1:{refused_port}/w-0123abcd.pth", cache, progress=False)


def test_local_path_checked_against_a_given_prefix(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(PAYLOAD)
    assert resolve_weights("m", str(path), ArtifactCache(tmp_path), sha256_prefix=PREFIX) == path
    with pytest.raises(RtmbenchError, match="corrupt or wrong file"):
        resolve_weights("m", str(path), ArtifactCache(tmp_path), sha256_prefix="00000000")
    with pytest.raises(RtmbenchError, match="no weights known for model m"):
        resolve_weights("m", None, ArtifactCache(tmp_path))


def test_hash_prefix_in_openmmlab_names():
    assert sha256_prefix_from_name("rtmdet_nano_8xb32-100e_coco-obj365-person-05d8511e.pth") == "05d8511e"
    assert sha256_prefix_from_name("model.pth") is None


def test_a_range_of_a_file_of_unknown_size_ends_where_its_body_does():
    from rtmbench.weights import _resumed_at

    answer = types.SimpleNamespace(status=206, headers={"Content-Range": "bytes 300000-1048575/*",
                                                        "Content-Length": "748576"})
    assert _resumed_at(answer, 300_000) == (300_000, len(PAYLOAD))  # a cut short is caught, not renamed into place
