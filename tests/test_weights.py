"""Weights download against a real HTTP server on 127.0.0.1: checksum, resume, offline errors."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rtmbench.cache import ArtifactCache
from rtmbench.errors import RtmbenchError
from rtmbench.weights import FetchFailed, download, resolve_weights, sha256_prefix_from_name

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PREFIX = hashlib.sha256(PAYLOAD).hexdigest()[:8]


class Server:
    """Serves PAYLOAD with Range support; ``drop_after`` cuts the first response short,
    ``chunk_delay`` slows every response (seconds between its 64 KiB chunks)."""

    def __init__(self):
        self.drop_after: int | None = None
        self.chunk_delay = 0.0
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
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                if start >= len(PAYLOAD):  # as real servers answer a range past the end
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = PAYLOAD[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_after is not None:
                    cut, server.drop_after = server.drop_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-file
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
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["nano-deadbeef.pth.lock"]  # empty, reusable


def test_dropped_connection_resumes_with_a_range_request(tmp_path, server):
    server.drop_after = 300_000
    path = resolve_weights("m", server.url(f"x-{PREFIX}.pth"), ArtifactCache(tmp_path), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [None, "bytes=300000-"]


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


def write_part(cache_root, name, content):
    part = cache_root / "weights" / f"{name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(content)
    return part


def test_a_complete_part_file_answered_416_is_verified_and_kept(tmp_path, server):
    """A .part that is already whole (the process died before the rename) gets HTTP 416 for its
    range: it is checked and renamed into place, not requested again and again."""
    write_part(tmp_path, f"x-{PREFIX}.pth", PAYLOAD)
    path = resolve_weights("m", server.url(f"x-{PREFIX}.pth"), ArtifactCache(tmp_path), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [f"bytes={len(PAYLOAD)}-"]


def test_a_416_with_no_checksum_keeps_a_part_only_of_the_files_size(tmp_path, server):
    """With no sha256 prefix to check, the size the 416 gives decides: a .part longer than the
    file is fetched again, one of its size is kept."""
    write_part(tmp_path, "plain.pth", PAYLOAD + b"junk")
    path = resolve_weights("m", server.url("plain.pth"), ArtifactCache(tmp_path), progress=False)
    assert path.read_bytes() == PAYLOAD and server.requests == [f"bytes={len(PAYLOAD) + 4}-", None]
    server.requests.clear()
    write_part(tmp_path / "again", "plain.pth", PAYLOAD)
    path = resolve_weights("m", server.url("plain.pth"), ArtifactCache(tmp_path / "again"), progress=False)
    assert path.read_bytes() == PAYLOAD and server.requests == [f"bytes={len(PAYLOAD)}-"]


def test_a_416_on_the_last_attempt_is_one_error_and_leaves_nothing(tmp_path, server):
    part = write_part(tmp_path, "plain.pth", PAYLOAD + b"junk")
    with pytest.raises(FetchFailed, match=r"after 1 attempts \(the partial file .*plain\.pth\.part was longer"):
        download(server.url("plain.pth"), part.with_suffix(""), None, attempts=1, progress=False)
    assert not part.exists() and not part.with_suffix("").exists()


def test_a_url_that_names_no_file_is_refused(tmp_path):
    with pytest.raises(RtmbenchError, match=r"^https://example\.com/: the URL names no file"):
        resolve_weights("m", "https://example.com/", ArtifactCache(tmp_path), progress=False)
    assert not (tmp_path / "weights").exists()


def test_a_wrong_part_file_answered_416_is_rejected_and_deleted(tmp_path, server):
    part = write_part(tmp_path, f"x-{PREFIX}.pth", PAYLOAD[::-1])
    with pytest.raises(RtmbenchError, match=rf"does not start with the expected {PREFIX}") as info:
        resolve_weights("m", server.url(f"x-{PREFIX}.pth"), ArtifactCache(tmp_path), progress=False)
    assert "\n" not in str(info.value)
    assert not part.exists() and len(server.requests) == 1


def test_unreachable_or_missing_says_what_to_download_and_where(tmp_path, server):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(RtmbenchError, match=r"HTTP 404.*Download .*missing-0123abcd\.pth.*put it at"):
        resolve_weights("m", server.url("missing-0123abcd.pth"), cache, progress=False)
    with pytest.raises(RtmbenchError, match="cannot reach the server.*Offline\\? Download"):
        resolve_weights("m", "http://127.0.0.1:9/w-0123abcd.pth", cache, progress=False)


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
