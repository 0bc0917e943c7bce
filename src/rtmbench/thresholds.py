"""``thresholds.yaml``: where each model's weights and data come from, its accuracy floors and
its throughput targets. Validated on load; an error names the file, the line and the key path.

Accuracy floors are absolute (``expected - tolerance``) and/or relative to the FP32 PyTorch
reference measured in the same session (``max_drop``). Throughput targets are absolute images/s
for a named device, or a ratio to another backend measured in the same run (``device: "*"``
matches any device, for CPU CI on unknown hardware).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Hashable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RtmbenchError

REFERENCE = ("torch", "fp32")  # the backend and precision relative floors compare against


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsSource(_Strict):
    url: str | None = None
    path: str | None = None  # relative to the thresholds file
    sha256: str = Field(pattern=r"^[0-9a-f]{8,64}$", description="sha256 or its prefix (≥ 8 hex digits)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.url is None) == (self.path is None):
            raise ValueError("give exactly one of url and path")
        return self


class DatasetSource(_Strict):
    kind: Literal["coco", "synthetic"]
    annotations: str = "person_keypoints"  # coco: person_keypoints, instances, or a path under the root
    split: str = "val2017"
    seed: int | None = None  # synthetic only
    num_images: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _synthetic_needs_seed(self):
        if self.kind == "synthetic" and (self.seed is None or self.num_images is None):
            raise ValueError("a synthetic dataset needs seed and num_images")
        return self


class Floor(_Strict):
    expected: float = Field(ge=0, le=1)
    tolerance: float = Field(ge=0, le=1)

    @property
    def minimum(self) -> float:
        return self.expected - self.tolerance


class AccuracyRule(_Strict):
    backends: list[str] = ["*"]  # fnmatch patterns
    precision: str
    mAP50: Floor | None = None
    mAP: Floor | None = None
    max_drop: dict[Literal["mAP", "mAP50"], float] = {}  # vs torch fp32 measured in the same session
    source: str = ""

    @model_validator(mode="after")
    def _has_a_floor(self):
        if self.mAP50 is None and self.mAP is None and not self.max_drop:
            raise ValueError("an accuracy rule needs mAP50, mAP or max_drop")
        return self


class RatioTarget(_Strict):
    backend: str
    precision: str
    min_ratio: float = Field(gt=0)


class PerfRule(_Strict):
    device: str  # device name as the backend reports it (case-insensitive fnmatch); "*" = any
    backend: str
    precision: str
    batch: int = Field(default=32, gt=0)
    images_per_s: float | None = Field(default=None, gt=0)
    tolerance: float = Field(default=0.05, ge=0, lt=1)  # fraction of images_per_s
    definition: Literal["compute", "end_to_end"] = "compute"
    ratio_to: RatioTarget | None = None
    sdk: str = ""
    source: str = ""

    @model_validator(mode="after")
    def _one_target(self):
        if (self.images_per_s is None) == (self.ratio_to is None):
            raise ValueError("give exactly one of images_per_s and ratio_to")
        if self.ratio_to is not None and "tolerance" in self.model_fields_set:
            raise ValueError("tolerance is a fraction of images_per_s; a ratio_to target's bound is its min_ratio")
        return self


class PerfValidity(_Strict):
    """What a perf measurement needs to count (else its verdict is INVALID). Defaults: 20 calls,
    so the median is not one lucky call, and 2 s of timed calls, longer than the clock and
    frequency transients of the first moments (a GPU's 2 s is several hundred batch-32 calls)."""

    min_rounds: int = Field(default=20, gt=0)
    min_seconds: float = Field(default=2.0, gt=0)

    def overridden(self, min_rounds: int | None = None, min_seconds: float | None = None) -> PerfValidity:
        """These rules with the minimums a command line gives (None: keep this rule's)."""
        return self.model_copy(update={name: value for name, value in (("min_rounds", min_rounds),
                                                                       ("min_seconds", min_seconds))
                                       if value is not None})


class ModelEntry(_Strict):
    weights: WeightsSource
    dataset: DatasetSource
    accuracy: list[AccuracyRule] = []
    perf: list[PerfRule] = []
    perf_validity: PerfValidity = PerfValidity()


class ThresholdsFile(_Strict):
    schema_version: Literal[1]
    models: dict[str, ModelEntry]


@dataclasses.dataclass
class Thresholds:
    """A validated thresholds file; relative paths inside resolve against ``path``'s folder."""

    path: Path
    data: ThresholdsFile

    def model(self, name: str) -> ModelEntry:
        if name not in self.data.models:
            raise RtmbenchError(f"{self.path}: no entry for model {name!r} "
                                f"(has {', '.join(self.data.models)})")
        return self.data.models[name]

    def weights_location(self, name: str) -> tuple[str, str]:
        """(URL or absolute path, sha256 prefix) of the model's weights."""
        w = self.model(name).weights
        return (w.url if w.url else str((self.path.parent / w.path).resolve())), w.sha256

    def accuracy_rule(self, name: str, backend: str, precision: str) -> AccuracyRule | None:
        for rule in self.model(name).accuracy:
            if rule.precision == precision and any(fnmatch.fnmatch(backend, p) for p in rule.backends):
                return rule
        return None

    def perf_rule(self, name: str, backend: str, precision: str, batch: int, device: str) -> PerfRule | None:
        """The most specific rule whose device matches: one naming the device exactly, else the
        longest matching pattern (``NVIDIA H200*`` before ``NVIDIA*``), else ``device: "*"``;
        None when none matches."""
        candidates = [r for r in self.model(name).perf
                      if (r.backend, r.precision, r.batch) == (backend, precision, batch)
                      and fnmatch.fnmatch(device.lower(), r.device.lower())]
        candidates.sort(key=lambda r: (any(c in r.device for c in "*?["), -len(r.device)))
        return candidates[0] if candidates else None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not "last
    wins", and that a value its tag cannot hold is a YAML error at its line, not a Python one."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError) as exc:  # `2026-11-31` (a date), `!!int abc`
            why = "" if isinstance(exc, KeyError) else f" ({exc})"  # a KeyError says only the value
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a valid {node.tag.rsplit(':', 1)[-1]}{why}",
                node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may override on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # `? [a, b]`: refused before the lookup below fails on it
                raise yaml.constructor.ConstructorError(
                    None, None, "a list or mapping cannot be a key", key_node.start_mark)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first_line[key]})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _line_of(root_node: yaml.Node, loc: tuple) -> int | None:
    """1-based line of the YAML node at pydantic's error location (or its nearest parent)."""
    node, line = root_node, root_node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            match = node.value[key]
        else:
            match = None
        if match is None:
            break
        node, line = match, match.start_mark.line + 1
    return line


def _read_text(path: Path) -> str:
    """The file's text, decoded as UTF-8 (as YAML files are) whatever the locale."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RtmbenchError(f"{path}: cannot read thresholds file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise RtmbenchError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
                            "save the file as UTF-8") from None


def _parse_yaml(path: Path, text: str) -> tuple[object, yaml.Node | None]:
    """The loaded data and the node tree (for line numbers) of ``text``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader), yaml.compose(text)
    except yaml.reader.ReaderError as exc:  # a control character; its own message spans two lines
        line = text.count("\n", 0, exc.position) + 1
        raise RtmbenchError(f"{path}:{line}: not valid YAML (control character "
                            f"U+{exc.character:04X} is not allowed)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RtmbenchError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (ValueError, TypeError, KeyError) as exc:  # raised by a collection's tag after its node: `!!set [1]`
        raise RtmbenchError(f"{path}: not valid YAML ({type(exc).__name__}: {exc})") from None
    except RecursionError:
        raise RtmbenchError(f"{path}: not valid YAML (nested too deeply)") from None


def load_thresholds(path: str | Path) -> Thresholds:
    """Read and validate a thresholds file; any problem is one line naming file, line and key."""
    path = Path(path)
    raw, root_node = _parse_yaml(path, _read_text(path))
    if raw is None:  # pydantic would say "Input should be a valid dictionary or instance of ThresholdsFile"
        raise RtmbenchError(f"{path}: empty (a thresholds file holds schema_version: 1 and models:)")
    try:
        data = ThresholdsFile.model_validate(raw)
    except ValidationError as exc:
        # A misspelt key shows up as both "unknown key" and "missing key": name the typo first.
        first = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc = tuple(p for p in first["loc"] if not str(p).startswith("function-"))
        line = _line_of(root_node, loc) if root_node is not None else None
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        key = ".".join(map(str, loc)) or "(top level)"
        where = f":{line}" if line is not None else ""  # an empty file has no lines
        raise RtmbenchError(f"{path}{where}: {key}: {first['msg']}{more}") from None
    return Thresholds(path.resolve(), data)
