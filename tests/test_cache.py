"""The artifact cache: one build across processes, nothing loadable left by a killed build, warm
hits that build nothing, keys that follow the weights and the SDK version, ``rebuild`` and the
``cache`` command."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rtmbench.artifacts import cached_onnx, open_engine
from rtmbench.backends.ort import OnnxRuntimeBackend
from rtmbench import cache as cache_module
from rtmbench.cache import ArtifactCache
from rtmbench.checkpoint import read_checkpoint
from rtmbench.errors import RtmbenchError

ROOT = Path(__file__).resolve().parents[1]
INPUTS = {"what": "test artifact", "version": 1}

# A child process that waits at a barrier (``ready/`` holds one file per waiting child) and then
# asks for INPUTS' entry. Its build writes half the artifact, touches ``building``, sleeps
# ``$SLEEP`` seconds (or until ``go`` exists), writes the rest and appends a line to ``builds``.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from rtmbench.cache import ArtifactCache

    work, parties, sleep, rebuild = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
    inputs = json.loads(sys.argv[5])

    def build(tmp):
        with open(tmp, "w") as f:
            f.write("first half;")
            f.flush()
            (work / "building").touch()
            deadline = time.time() + sleep
            while time.time() < deadline and not (work / "go").exists():
                time.sleep(0.02)
            f.write(f"second half by {os.getpid()}")
        with open(work / "builds", "a") as f:
            f.write(f"{os.getpid()}\\n")

    (work / "ready").mkdir(exist_ok=True)
    (work / "ready" / str(os.getpid())).touch()
    while len(list((work / "ready").iterdir())) < parties:
        time.sleep(0.01)
    cache = ArtifactCache(work / "cache", rebuild=rebuild)
    path = cache.get_or_build("things", inputs, "thing.txt", build)
    print(json.dumps({"path": str(path), "built": [str(p) for p in cache.built]}))
""")


@pytest.fixture
def start_child():
    """``start_child(work, parties, sleep, rebuild)`` → the running child; any still running at
    teardown (a failed test) is killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    children: list[subprocess.Popen] = []

    def start(work: Path, parties: int = 1, sleep: float = 1.0, rebuild: bool = False) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(work), str(parties), str(sleep),
                                  "1" if rebuild else "0", json.dumps(INPUTS)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
            child.communicate()


def finish(child: subprocess.Popen) -> dict:
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    return json.loads(out)


def wait_for(path: Path, child: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert child.poll() is None, child.communicate()[1]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def builds(work: Path) -> list[str]:
    return (work / "builds").read_text().split() if (work / "builds").exists() else []


def test_two_processes_build_once(tmp_path, start_child):
    children = [start_child(tmp_path, parties=2, sleep=1.0) for _ in range(2)]
    results = [finish(child) for child in children]
    assert len(builds(tmp_path)) == 1
    assert results[0]["path"] == results[1]["path"]
    assert sorted(len(r["built"]) for r in results) == [0, 1]  # the other one waited and reused it
    path = Path(results[0]["path"])
    assert path.read_text() == f"first half;second half by {builds(tmp_path)[0]}"
    assert [e["path"] for e in ArtifactCache(tmp_path / "cache").entries()] == [str(path)]


def test_one_artifact_under_two_names_is_two_entries(tmp_path, caplog):
    """One graph exported for two model names (same spec, same weights): each name loads its own
    file, neither's manifest is overwritten by the other's, nothing is rebuilt."""
    cache = ArtifactCache(tmp_path)
    names = ["a.onnx", "b.onnx", "a.onnx", "b.onnx"]
    with caplog.at_level(logging.WARNING, logger="rtmbench.cache"):
        paths = [cache.get_or_build("onnx", INPUTS, name, lambda tmp: tmp.write_bytes(os.urandom(8))) for name in names]
    assert [p.name for p in paths] == names and paths[0] == paths[2] and paths[0].parent != paths[1].parent
    assert cache.built == paths[:2] and caplog.records == []


def test_killed_build_leaves_nothing_loadable(tmp_path, start_child):
    child = start_child(tmp_path, sleep=60)
    wait_for(tmp_path / "building", child)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    cache = ArtifactCache(tmp_path / "cache")
    entry = cache.entry_dir("things", INPUTS, "thing.txt")
    assert [p.name for p in entry.iterdir()] == [f".thing.txt.{child.pid}.part"]  # half-written, aside
    assert cache.entries() == []

    path = cache.get_or_build("things", INPUTS, "thing.txt", lambda tmp: tmp.write_text("whole"))
    assert cache.built == [path] and path.read_text() == "whole"
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "thing.txt"]  # the .part is gone
    assert [e["path"] for e in cache.entries()] == [str(path)]
    assert builds(tmp_path) == []  # the killed build never finished


def test_rebuild_keeps_the_old_artifact_until_the_new_one_replaces_it(tmp_path, start_child):
    """A reader that found the entry complete just before another process started rebuilding it
    still finds the artifact at the path it was given."""
    cache = ArtifactCache(tmp_path / "cache")
    old = cache.get_or_build("things", INPUTS, "thing.txt", lambda tmp: tmp.write_text("old"))
    child = start_child(tmp_path, sleep=60, rebuild=True)
    wait_for(tmp_path / "building", child)
    assert old.read_text() == "old"
    (tmp_path / "go").touch()
    late = ArtifactCache(tmp_path / "cache")  # arrives mid-rebuild: waits for it, builds nothing
    path = late.get_or_build("things", INPUTS, "thing.txt", lambda tmp: pytest.fail("rebuilt twice"))
    assert finish(child)["built"] == [str(path)] and path == old and late.built == []
    assert path.read_text() == f"first half;second half by {child.pid}"


def test_an_artifact_whose_manifest_cannot_be_written_is_not_left(tmp_path, monkeypatch):
    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module, "write_bytes_atomic", full_disk)
    artifact = ArtifactCache(tmp_path).entry_dir("things", INPUTS, "thing.txt") / "thing.txt"
    with pytest.raises(RtmbenchError, match=rf"^{artifact}: not built \(No space left on device\)$"):
        ArtifactCache(tmp_path).get_or_build("things", INPUTS, "thing.txt", lambda tmp: tmp.write_text("whole"))
    assert [p.name for p in (tmp_path / "things").iterdir()] == [p.name for p in (tmp_path / "things").glob("*.lock")]


def test_rebuild_once_per_cache_instance(tmp_path):
    count: list[str] = []

    def build(tmp):
        count.append(tmp.name)
        tmp.write_text(str(len(count)))

    path = ArtifactCache(tmp_path).get_or_build("things", INPUTS, "thing.txt", build)
    built_at = json.loads((path.parent / "manifest.json").read_text())["built_at"]
    cache = ArtifactCache(tmp_path, rebuild=True)
    for _ in range(3):
        assert cache.get_or_build("things", INPUTS, "thing.txt", build) == path
    assert len(count) == 2 and path.read_text() == "2"
    assert json.loads((path.parent / "manifest.json").read_text())["built_at"] > built_at
    for _ in range(2):  # an entry that did not exist yet: built once too
        cache.get_or_build("things", {"other": True}, "thing.txt", build)
    assert len(count) == 3 and len(cache.built) == 2
    ArtifactCache(tmp_path, rebuild=True).get_or_build("things", INPUTS, "thing.txt", build)
    assert len(count) == 4  # a new instance rebuilds again


def test_rebuild_once_per_run_whatever_the_processes(tmp_path):
    """pytest-xdist workers share the run's id: the first rebuilds, the others load its build."""
    count: list[str] = []

    def build(tmp):
        count.append(tmp.name)
        tmp.write_text(str(len(count)))

    ArtifactCache(tmp_path).get_or_build("things", INPUTS, "thing.txt", build)
    workers = [ArtifactCache(tmp_path, rebuild=True, run="run-1") for _ in range(3)]
    paths = {worker.get_or_build("things", INPUTS, "thing.txt", build) for worker in workers}
    assert len(count) == 2 and [len(worker.built) for worker in workers] == [1, 0, 0]
    assert {path.read_text() for path in paths} == {"2"}
    ArtifactCache(tmp_path, rebuild=True, run="run-2").get_or_build("things", INPUTS, "thing.txt", build)
    assert len(count) == 3  # the next run rebuilds again


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, capsys):
    from rtmbench.cli import main

    (tmp_path / "a-file").write_text("not a folder")
    cache = tmp_path / "a-file" / "cache"
    thresholds = Path(__file__).resolve().parents[1] / "thresholds.yaml"
    assert main(["build", "--model", "rtmdet-nano-synthetic", "--thresholds", str(thresholds),
                 "--cache-dir", str(cache)]) == 2
    assert capsys.readouterr().err == (f"rtmbench: error: {cache}/onnx: cannot create a folder in the cache (Not a "
                                       f"directory); pass --cache-dir or set RTMBENCH_CACHE_DIR to a writable folder\n")


def test_a_lock_the_cache_cannot_hold_is_one_line(tmp_path, monkeypatch):
    """A read-only cache (here: a folder FileLock cannot open its file in) refuses the lock with
    one line, where a download, a build or a perf timing would take it."""
    from rtmbench.cache import cache_lock

    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("filelock.FileLock.acquire", read_only)
    lock = tmp_path / "weights" / "x.pth.lock"
    with pytest.raises(RtmbenchError, match=f"^{lock}: cannot lock in the cache \\(Read-only file system\\); pass "):
        with cache_lock(lock):
            pytest.fail("locked")
    with pytest.raises(RtmbenchError, match="cannot lock in the cache"):
        ArtifactCache(tmp_path).get_or_build("things", INPUTS, "thing.txt", lambda tmp: tmp.write_text("x"))


def _listed(kind: str, megabytes: float, artifact: Path) -> str:
    """``cache ls``'s line for an entry, its build time and duration as its manifest records them."""
    record = json.loads((artifact.parent / "manifest.json").read_text())
    built = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record["built_at"]))
    return f"{kind:8} {megabytes:8.2f} MB  {built}  {record['build_seconds']:6.1f} s  {artifact}"


def test_cache_ls_and_clear(tmp_path, run_cli):
    root = tmp_path / "cache"
    cache = ArtifactCache(root)
    onnx = cache.get_or_build("onnx", {"a": 1}, "m.onnx", lambda tmp: tmp.write_bytes(b"x" * 2_000_000))
    engine = cache.get_or_build("engines", {"b": 2}, "m.engine", lambda tmp: tmp.write_bytes(b"y" * 10))
    header, *rows, total = run_cli("cache", "ls", "--cache-dir", root).stdout.splitlines()
    assert header.split() == ["kind", "size", "built", "(UTC)", "took", "path"]
    assert sorted(rows) == sorted([_listed("engines", 0.0, engine), _listed("onnx", 2.0, onnx)])
    assert total == f"2 entries, 2.00 MB in {root}"
    assert run_cli("cache", "clear", "--cache-dir", root).stdout.strip() == f"cleared {root}"
    assert list(root.iterdir()) == []
    assert run_cli("cache", "ls", "--cache-dir", root).stdout == ""



def test_manifest_records_the_artifact_size_and_sha256(tmp_path):
    cache = ArtifactCache(tmp_path)
    path = cache.get_or_build("things", INPUTS, "thing.txt", lambda tmp: tmp.write_text("whole"))
    record = json.loads((path.parent / "manifest.json").read_text())
    assert (record["size_bytes"], record["sha256"]) == (5, hashlib.sha256(b"whole").hexdigest())

    def build_folder(tmp):
        (tmp / "images").mkdir(parents=True)
        (tmp / "images" / "a.jpg").write_bytes(b"jpeg")
    folder = cache.get_or_build("datasets", INPUTS, "data", build_folder)
    record = json.loads((folder.parent / "manifest.json").read_text())
    assert record["size_bytes"] == 4 and len(record["sha256"]) == 64
    (folder / "images" / "a.jpg").rename(folder / "images" / "b.jpg")  # same bytes, another name
    assert ArtifactCache(tmp_path).get_or_build("datasets", INPUTS, "data", build_folder) == folder
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["a.jpg"]  # rebuilt


def _rewrite_manifest(path: Path, change) -> None:
    manifest = path.parent / "manifest.json"
    manifest.write_text(change(manifest.read_text()))


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_text("WHOLE"), "its sha256 differs from the one recorded when it was built (altered)"),
    (lambda p: p.write_text("who"), "3 bytes, 5 when built (truncated or altered)"),
    (lambda p: _rewrite_manifest(p, lambda text: text[:20]), "manifest.json is not valid JSON"),
    (lambda p: _rewrite_manifest(p, lambda text: text.replace('"sha256"', '"sha"')),
     "manifest.json records no size and sha256 (built by an older rtmbench)"),
], ids=["altered", "truncated", "torn-manifest", "old-manifest"])
def test_a_damaged_entry_is_named_and_rebuilt(tmp_path, caplog, damage, why):
    def build(tmp):
        tmp.write_text("whole")

    path = ArtifactCache(tmp_path).get_or_build("things", INPUTS, "thing.txt", build)
    damage(path)
    cache = ArtifactCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rtmbench.cache"):
        assert cache.get_or_build("things", INPUTS, "thing.txt", build) == path
    assert [r.getMessage() for r in caplog.records] == [f"{path}: {why}; rebuilding it"]
    assert cache.built == [path] and path.read_text() == "whole"
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json", "thing.txt"]
    again = ArtifactCache(tmp_path)
    again.get_or_build("things", INPUTS, "thing.txt", build)
    assert again.built == []  # intact again


def test_a_manifest_gone_while_checked_means_wait_for_the_lock(tmp_path, monkeypatch):
    """Another process unlinks the manifest when it starts a rebuild; a reader checking the entry
    at that moment waits for the lock and then loads the entry, without a traceback."""
    path = ArtifactCache(tmp_path).get_or_build("things", INPUTS, "thing.txt", lambda tmp: tmp.write_text("whole"))
    checks = []

    def gone_on_first_check(artifact, manifest):
        checks.append(manifest)
        if len(checks) == 1:
            raise FileNotFoundError(manifest)
        return intact(artifact, manifest)

    intact = cache_module._damage
    monkeypatch.setattr(cache_module, "_damage", gone_on_first_check)
    cache = ArtifactCache(tmp_path)
    assert cache.get_or_build("things", INPUTS, "thing.txt", lambda tmp: pytest.fail("rebuilt")) == path
    assert len(checks) == 2 and cache.built == []


def test_cache_clear_empties_a_linked_cache_dir_and_keeps_the_link(tmp_path, run_cli):
    target, root = tmp_path / "big-disk", tmp_path / "cache"
    target.mkdir()
    root.symlink_to(target)
    ArtifactCache(root).get_or_build("onnx", {"a": 1}, "m.onnx", lambda tmp: tmp.write_bytes(b"x"))
    assert run_cli("cache", "clear", "--cache-dir", root).stdout.strip() == f"cleared {root}"
    assert root.is_symlink() and list(target.iterdir()) == []
    assert ArtifactCache(root).get_or_build("onnx", {"a": 1}, "m.onnx", lambda tmp: tmp.write_bytes(b"y")).read_bytes() == b"y"


def test_cache_ls_names_a_torn_manifest_and_a_cache_dir_that_is_a_file(tmp_path, run_cli):
    root = tmp_path / "cache"
    cache = ArtifactCache(root)
    good = cache.get_or_build("onnx", {"a": 1}, "m.onnx", lambda tmp: tmp.write_bytes(b"x" * 10))
    torn = cache.get_or_build("engines", {"b": 2}, "m.engine", lambda tmp: tmp.write_bytes(b"y" * 10))
    (torn.parent / "manifest.json").write_text('{"kind": "eng')
    listed = run_cli("cache", "ls", "--cache-dir", root)
    assert listed.stdout.splitlines()[1:] == [_listed("onnx", 0.0, good), f"1 entry, 0.00 MB in {root}"]
    _rewrite_manifest(good, lambda text: re.sub(r'"built_at": [0-9.]+', '"built_at": "yesterday"', text))
    edited = run_cli("cache", "ls", "--cache-dir", root).stdout.splitlines()[1]
    assert edited.split()[3] == "?"  # the date shown as unknown, not a traceback
    assert listed.stderr.strip() == (f"WARNING rtmbench.cache: {torn.parent / 'manifest.json'}: not a valid "
                                     f"manifest; the entry is rebuilt when next needed")
    a_file = tmp_path / "cache-file"
    a_file.write_text("not a folder")
    refused = run_cli("cache", "ls", "--cache-dir", a_file, check=False)
    assert refused.returncode == 2
    assert refused.stderr == f"rtmbench: error: {a_file}: the cache dir is not a folder\n"
    assert a_file.read_text() == "not a folder"

# Engines through the cache (ONNX Runtime FP32, the reference checkpoint).

@pytest.fixture(scope="module")
def engine_cache_root(tmp_path_factory, reference, nano_spec):
    """A cache holding the reference export and its ONNX Runtime FP32 engine."""
    root = tmp_path_factory.mktemp("engine-cache")
    cache = ArtifactCache(root)
    open_engine(nano_spec, reference.checkpoint, "onnxruntime", "fp32", 1, cache).engine.close()
    assert sorted(p.parent.parent.name for p in cache.built) == ["engines", "onnx"]
    return root


def manifests(root: Path) -> dict[str, dict]:
    return {str(p.parent): json.loads(p.read_text()) for p in root.glob("*/*/manifest.json")}


def test_warm_cache_builds_nothing(engine_cache_root, reference, nano_spec):
    before = manifests(engine_cache_root)
    cache = ArtifactCache(engine_cache_root)
    handle = open_engine(nano_spec, reference.checkpoint, "onnxruntime", "fp32", 1, cache)
    with handle.engine as engine:
        outputs = engine.infer(reference.golden["inputs"][:1])
    assert cache.built == []
    assert manifests(engine_cache_root) == before  # built_at (and everything else) unchanged
    assert str(handle.path.parent) in before and handle.key == handle.path.parent.name
    assert set(outputs) == {"cls_score_0", "cls_score_1", "cls_score_2", "bbox_pred_0", "bbox_pred_1", "bbox_pred_2"}


def test_engine_key_follows_the_weights(engine_cache_root, reference, nano_spec, tmp_path):
    state, _ = read_checkpoint(reference.checkpoint)
    name = next(k for k in state if k.endswith("rtm_reg.0.weight"))
    state[name] = state[name] + 1e-3
    perturbed = tmp_path / "perturbed.pth"
    torch.save({"state_dict": state}, perturbed)

    cache = ArtifactCache(engine_cache_root)
    original = open_engine(nano_spec, reference.checkpoint, "onnxruntime", "fp32", 1, cache)
    changed = open_engine(nano_spec, perturbed, "onnxruntime", "fp32", 1, cache)
    for handle in (original, changed):
        handle.engine.close()
    assert changed.path.parent != original.path.parent and changed.key != original.key
    assert changed.onnx.parent != original.onnx.parent  # a new export for the new weights
    assert sorted(p.parent.parent.name for p in cache.built) == ["engines", "onnx"]


def test_engine_key_follows_the_backend_version(engine_cache_root, reference, nano_spec, monkeypatch):
    cache = ArtifactCache(engine_cache_root)
    original = open_engine(nano_spec, reference.checkpoint, "onnxruntime", "fp32", 1, cache)
    monkeypatch.setattr(OnnxRuntimeBackend, "sdk_version", classmethod(lambda cls: "0.0.0-test"))
    upgraded = open_engine(nano_spec, reference.checkpoint, "onnxruntime", "fp32", 1, cache)
    for handle in (original, upgraded):
        handle.engine.close()
    assert upgraded.path.parent != original.path.parent
    assert upgraded.onnx == original.onnx  # same export, new engine
    assert cache.built == [upgraded.path]
    assert json.loads((upgraded.path.parent / "manifest.json").read_text())["inputs"]["version"] == "0.0.0-test"



def test_an_engine_that_fails_to_build_is_one_line_and_leaves_nothing(engine_cache_root, reference, nano_spec,
                                                                        tmp_path, monkeypatch):
    """An SDK error of many lines, after writing half an engine: one line naming the ONNX file,
    no entry left behind (only the lock files every build leaves)."""
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(engine_cache_root, root)
    before = sorted(root.glob("engines/*"))

    def failing_build(self, source, precision, batch, out):
        out.write_bytes(b"half an engine")
        raise RuntimeError("[E] builder: out of device memory\n  at layer 12\n  (workspace 4 GiB)")

    monkeypatch.setattr(OnnxRuntimeBackend, "sdk_version", classmethod(lambda cls: "0.0.0-broken"))
    monkeypatch.setattr(OnnxRuntimeBackend, "build", failing_build)
    with pytest.raises(RtmbenchError) as failed:
        open_engine(nano_spec, reference.checkpoint, "onnxruntime", "fp32", 1, ArtifactCache(root))
    onnx = cached_onnx(nano_spec, reference.checkpoint, ArtifactCache(root))  # a cache hit: what it built from
    assert str(failed.value) == (f"{onnx}: building the onnxruntime fp32 engine failed: "
                                 "[E] builder: out of device memory")
    after = sorted(root.glob("engines/*"))
    assert [p for p in after if p not in before and p.suffix != ".lock"] == []


def test_an_engine_the_sdk_cannot_load_is_one_line_naming_it(engine_cache_root, reference, nano_spec, monkeypatch):
    def failing_load(self, source, artifact, precision, batch):
        raise RuntimeError("[E] deserialize: engine plan built by another version\n  (magic 0x0)")

    monkeypatch.setattr(OnnxRuntimeBackend, "load", failing_load)
    with pytest.raises(RtmbenchError) as failed:
        open_engine(nano_spec, reference.checkpoint, "onnxruntime", "fp32", 1, ArtifactCache(engine_cache_root))
    assert re.fullmatch(rf"{engine_cache_root}/engines/\w+/rtmdet-nano-person-onnxruntime-fp32\.ort\.onnx: loading "
                        r"the onnxruntime fp32 engine failed: \[E\] deserialize: engine plan built by another "
                        r"version \(--rebuild builds it anew\)", str(failed.value)), str(failed.value)


@pytest.mark.parametrize("damage", ["altered", "truncated"])
def test_a_damaged_engine_is_rebuilt_not_scored(engine_cache_root, reference, nano_spec, tmp_path, damage):
    """Same size with weights zeroed, or cut short (ONNX Runtime: INVALID_PROTOBUF): rebuilt, then
    the engine gives the intact engine's outputs."""
    import shutil

    import numpy as np

    def outputs(cache):
        handle = open_engine(nano_spec, reference.checkpoint, "onnxruntime", "fp32", 1, cache)
        with handle.engine as engine:
            return engine.infer(reference.golden["inputs"][:1]), handle.path

    intact, intact_path = outputs(ArtifactCache(engine_cache_root))
    root = tmp_path / "cache"
    shutil.copytree(engine_cache_root, root)
    engine_path = root / intact_path.relative_to(engine_cache_root)  # other tests add entries beside it
    data = engine_path.read_bytes()
    middle = len(data) // 2
    damaged = data[:middle] + bytes(len(data) - middle) if damage == "altered" else data[:middle]
    engine_path.write_bytes(damaged)
    cache = ArtifactCache(root)
    rebuilt, _ = outputs(cache)
    assert cache.built == [engine_path] and engine_path.read_bytes() != damaged
    for name, expected in intact.items():
        np.testing.assert_allclose(rebuilt[name], expected, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_cache_hit_imports_no_torch_onnx_or_simplifier(tmp_path, backend, run_cli):
    """The warm start: once built, loading the engine needs none of what built it."""
    cache = tmp_path / "cache"
    args = ("build", "--model", "rtmdet-nano-synthetic", "--backend", backend, "--precision", "fp32",
            "--batch-size", "32", "--cache-dir", cache)
    built = run_cli(*args).stdout.strip()
    code = textwrap.dedent(f"""
        import sys
        from rtmbench.cli import main
        assert main({[str(a) for a in args]!r}) == 0
        print(*sorted(m for m in ("torch", "onnx", "onnxsim", "onnxslim") if m in sys.modules))
    """)
    src = str(Path(__file__).resolve().parents[1] / "src")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": src})
    assert result.returncode == 0, result.stderr
    path, imported = result.stdout.splitlines()
    assert path == built and imported == "", f"a cache hit imported {imported}"


def test_the_code_that_makes_an_artifact_is_in_its_key(tmp_path, monkeypatch, engine_cache_root):
    """A fix to the exporter or to a builder makes its artifacts anew, as a new SDK version does."""
    package = tmp_path / "made_by"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "exporter.py").write_text("GRAPH = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = cache_module.source_digest("made_by")
    (package / "exporter.py").write_text("GRAPH = 2\n")
    cache_module.source_digest.cache_clear()
    assert cache_module.source_digest("made_by") != before
    codes = {entry["inputs"]["code"] for entry in manifests(engine_cache_root).values()}  # the export, the engine
    assert codes == {cache_module.source_digest("rtmbench.model", "rtmbench.checkpoint", "rtmbench.export"),
                     cache_module.source_digest("rtmbench.backends.ort")}

