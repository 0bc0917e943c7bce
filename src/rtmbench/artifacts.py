"""From a model name and weights to a loaded engine, every step through the artifact cache."""

from __future__ import annotations

import dataclasses
import logging
from importlib import metadata
from pathlib import Path

from .backends import Engine, ModelSource, get_backend
from .cache import ArtifactCache, file_sha256, source_digest
from .errors import RtmbenchError, first_line
from .export import DEFAULT_OPSET, SIMPLIFIERS
from .model import ModelSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineHandle:
    """A loaded engine with where it came from (the perf JSON and results rows carry these)."""

    engine: Engine
    backend: str
    key: str | None
    path: Path | None
    onnx: Path | None
    description: dict


def spec_fingerprint(spec: ModelSpec) -> dict:
    """The spec fields that change the exported graph (not its name or description)."""
    fields = dataclasses.asdict(spec)
    for cosmetic in ("name", "description"):
        fields.pop(cosmetic)
    return fields


def package_version(name: str) -> str | None:
    """An installed package's version from its metadata, without importing it (a cache hit
    must not pay for importing torch, onnx or onnxsim)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cached_onnx(spec: ModelSpec, weights: Path | None, cache: ArtifactCache, opset: int = DEFAULT_OPSET,
                simplify: bool = True) -> Path:
    """Export (and simplify) ``spec`` with ``weights`` to ONNX once; later calls reuse the file."""
    inputs = {"model": spec_fingerprint(spec), "weights_sha256": file_sha256(weights) if weights else None,
              "opset": opset, "simplify": simplify, "torch": package_version("torch"),
              "onnx": package_version("onnx"),
              "simplifier": {name: package_version(name) for name in SIMPLIFIERS} if simplify else None,
              "code": source_digest("rtmbench.model", "rtmbench.checkpoint", "rtmbench.export")}

    def build(tmp: Path) -> None:
        from . import export
        from .checkpoint import load_weights
        from .model import RTMDet

        model = RTMDet(spec)
        if weights is not None:
            load_weights(model, weights)
        export.export_onnx(model, tmp, opset=opset, do_simplify=simplify)

    return cache.get_or_build("onnx", inputs, f"{spec.name}.onnx", build)


def normalized_onnx(spec: ModelSpec, onnx_path: Path, cache: ArtifactCache) -> Path:
    """A copy of a user's ONNX file with our input and output names and order (``onnx_io``)."""
    from .onnx_io import external_data_locations, normalize_onnx

    if not onnx_path.is_file():
        raise RtmbenchError(f"{onnx_path}: ONNX file not found")
    external = {location: file_sha256(onnx_path.parent / location) for location in external_data_locations(onnx_path)
                if (onnx_path.parent / location).is_file()}  # one missing: the build says so
    inputs = {"user_onnx_sha256": file_sha256(onnx_path), "external_data_sha256": external,
              "model": spec_fingerprint(spec), "onnx": package_version("onnx"), "code": source_digest("rtmbench.onnx_io")}

    def build(tmp: Path) -> None:
        normalize_onnx(onnx_path, spec, tmp)

    return cache.get_or_build("onnx", inputs, f"{onnx_path.stem}.onnx", build)


def open_engine(spec: ModelSpec, weights: Path | None, backend_name: str, precision: str,
                batch: int, cache: ArtifactCache, onnx: Path | None = None,
                opset: int = DEFAULT_OPSET) -> EngineHandle:
    """Build (or reuse) and load the engine for (model, weights, backend, precision, batch).

    ``onnx`` replaces the export step (bring your own ONNX model): its outputs are matched to
    ours and renamed in a cached copy, which the engine is built from.
    """
    backend = get_backend(backend_name)
    ok, why = backend.available()
    if not ok:
        raise RtmbenchError(f"backend {backend_name} is unavailable: {why}")
    backend.check_precision(precision)
    if onnx is not None and not backend.runs_onnx:
        raise RtmbenchError(f"backend {backend_name} runs the PyTorch model from the weights, not an ONNX file: "
                            f"--onnx {onnx} applies to the backends that build from ONNX")
    if backend.artifact_suffix is None:
        source = ModelSource(spec, weights, None)
        engine = backend.load(source, None, precision, batch)
        return EngineHandle(engine, backend_name, None, None, None,
                            {**backend.describe(), **engine.describe()})
    if onnx is None:
        onnx = cached_onnx(spec, weights, cache, opset=opset)
    else:
        given, onnx = Path(onnx), normalized_onnx(spec, Path(onnx), cache)
        from .onnx_io import fixed_batch

        if (fixed := fixed_batch(onnx)) not in (None, batch):
            raise RtmbenchError(f"{given}: its input has a fixed batch of {fixed}, not {batch}: run it with "
                                f"--batch-size {fixed}, or export it with a dynamic batch")
    source = ModelSource(spec, weights, Path(onnx))
    inputs = {"onnx_sha256": file_sha256(onnx), **backend.build_key(precision, batch)}

    def build(tmp: Path) -> None:
        try:
            backend.build(source, precision, batch, tmp)
        except RtmbenchError:
            raise
        except Exception as exc:  # SDK errors come in every type; report them as one line
            reason = first_line(exc)
            raise RtmbenchError(f"{onnx}: building the {backend_name} {precision} engine failed: {reason}") from exc

    artifact = cache.get_or_build("engines", inputs, f"{spec.name}-{backend_name}-{precision}"
                                  f"{backend.artifact_suffix}", build)
    try:
        engine = backend.load(source, artifact, precision, batch)
    except RtmbenchError:
        raise
    except Exception as exc:  # an SDK that cannot deserialize what it built (or runs short of memory)
        raise RtmbenchError(f"{artifact}: loading the {backend_name} {precision} engine failed: {first_line(exc)} "
                            f"(--rebuild builds it anew)") from exc
    return EngineHandle(engine, backend_name, artifact.parent.name, artifact, Path(onnx),
                        {**backend.describe(), **engine.describe()})
