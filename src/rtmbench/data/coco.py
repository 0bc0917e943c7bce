"""COCO-layout datasets: the seed's val2017 person layout, COCO's own unzip layout, generated data.

Accepted layouts under a root:
- ``images/<split>/`` with ``annotations/person_keypoints_<split>.json`` (the seed's; default);
- ``<split>/`` beside ``annotations/`` (COCO's zips unpacked as they come);
- ``annotations/instances_<split>.json`` with categories filtered by name (``annotation='instances'``).
Every image in the annotation file is evaluated, including those without a person.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from ..cache import file_sha256
from ..errors import RtmbenchError

ANNOTATION_KINDS = {"person_keypoints": "person_keypoints_{split}.json",
                    "instances": "instances_{split}.json"}


@dataclasses.dataclass
class CocoDataset:
    """An opened COCO-layout dataset; ``category_ids[k]`` is the dataset id of model class k."""

    root: Path
    annotation_file: Path
    image_dir: Path
    images: list[dict]  # COCO image records: id, file_name, width, height
    category_ids: list[int]
    annotation_sha256: str

    def items(self, max_images: int | None = None) -> list[tuple[int, Path]]:
        """(image id, path) pairs in annotation-file order, the first ``max_images`` if given."""
        return [(im["id"], self.image_dir / im["file_name"]) for im in self.images[:max_images]]

    def fingerprint(self, max_images: int | None = None) -> dict:
        return {"root": str(self.root), "annotation_file": str(self.annotation_file),
                "annotation_sha256": self.annotation_sha256,
                "images": len(self.images[:max_images])}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What a record's field must hold for the evaluator not to fail on it: (check, what it must be)
_ANY = (lambda value: True, "")
_TEXT = (lambda value: isinstance(value, str), "a string")
_NUMBER = (_is_number, "a number")
_BOX = (lambda value: isinstance(value, list) and len(value) == 4 and all(map(_is_number, value)), "[x, y, w, h]")


def _first_incomplete(section: str, records: object, fields: dict[str, tuple]) -> str | None:
    """What is wrong with the first record of ``section`` that lacks one of ``fields`` or holds
    something else (``fields``: name → (check, what it must be)), e.g. ``images[3] has no
    'file_name'``; None when every record is whole. One pass: cheap next to parsing the JSON."""
    if not isinstance(records, list):
        return f"{section} is not a list"
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            return f"{section}[{i}] is not an object"
        for key, (valid, kind) in fields.items():
            if key not in record:
                return f"{section}[{i}] has no {key!r}"
            if not valid(record[key]):
                return f"{section}[{i}] {key!r} is not {kind} ({record[key]!r})"
    return None


def open_coco(root: str | Path, class_names: Sequence[str] = ("person",), split: str = "val2017",
              annotation: str | Path = "person_keypoints") -> CocoDataset:
    """Open and validate a dataset. ``annotation`` is a kind from ``ANNOTATION_KINDS`` or a path.

    Raises :class:`RtmbenchError` with one line for a missing root, annotation file, image
    folder, images, or class, or an image, category or annotation record lacking a field the
    evaluator reads (or holding the wrong kind of value there).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise RtmbenchError(f"{root}: dataset root not found (expected a folder in the COCO layout)")
    if str(annotation) in ANNOTATION_KINDS:
        ann_file = root / "annotations" / ANNOTATION_KINDS[str(annotation)].format(split=split)
    else:
        ann_file = Path(annotation)
    if not ann_file.is_file():
        raise RtmbenchError(f"{ann_file}: annotation file not found (expected the COCO layout "
                            f"{root}/annotations/{ANNOTATION_KINDS.get(str(annotation), ann_file.name).format(split=split)})")
    image_dir = next((d for d in (root / "images" / split, root / split) if d.is_dir()), None)
    if image_dir is None:
        raise RtmbenchError(f"{root}: no image folder (looked for images/{split}/ and {split}/)")
    try:
        data = json.loads(ann_file.read_bytes())
        images, categories, annotations = data["images"], data["categories"], data["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RtmbenchError(f"{ann_file}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None
    problem = (_first_incomplete("images", images, {"id": _ANY, "file_name": _TEXT})
               or _first_incomplete("categories", categories, {"id": _ANY, "name": _TEXT})
               or _first_incomplete("annotations", annotations, {"image_id": _ANY, "category_id": _ANY,
                                                                 "bbox": _BOX, "area": _NUMBER}))
    if problem:
        raise RtmbenchError(f"{ann_file}: {problem}")
    if not images:
        raise RtmbenchError(f"{ann_file}: lists no images (nothing to evaluate)")
    by_name = {c["name"]: c["id"] for c in categories}
    missing_classes = [n for n in class_names if n not in by_name]
    if missing_classes:
        raise RtmbenchError(f"{ann_file}: no category named {', '.join(missing_classes)} "
                            f"(has {', '.join(sorted(by_name)) or 'none'})")
    absent = [im["file_name"] for im in images if not (image_dir / im["file_name"]).is_file()]
    if absent:
        raise RtmbenchError(f"{image_dir}: {len(absent)} of {len(images)} images listed in "
                            f"{ann_file.name} are missing (first: {absent[0]}); partial dataset?")
    return CocoDataset(root, ann_file, image_dir, images, [by_name[n] for n in class_names],
                       file_sha256(ann_file))
