"""Options and session fixtures for the gates (benchmarks/) and the harness's own tests (tests/).

Thin by design: every fixture calls into ``src/rtmbench``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT / "fixtures"


class Reference:
    """Test vectors made with mmdet itself (fixtures/mmdet-reference/README.md)."""

    def __init__(self, root: Path):
        self.root = root
        self.checkpoint = root / "checkpoint.pth"
        self.info = json.loads((root / "golden.json").read_text())
        self.image_paths = [root / "images" / im["file"] for im in self.info["images"]]
        with np.load(root / "golden.npz") as golden:
            self.golden = dict(golden)

    @property
    def raw_outputs(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.golden.items() if k.startswith(("cls_score", "bbox_pred"))}

    def detections(self):
        from rtmbench.postprocess import Detections

        g = self.golden
        return [Detections(g[f"dets_{i}_bboxes"], g[f"dets_{i}_scores"], g[f"dets_{i}_labels"])
                for i in range(len(self.image_paths))]

    def metas(self):
        from rtmbench.data import ImageMeta

        return [ImageMeta(tuple(im["ori_shape"]), tuple(im["scale_factor"])) for im in self.info["images"]]


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference(FIXTURES / "mmdet-reference")


@pytest.fixture(scope="session")
def nano_spec():
    from rtmbench.model import get_spec

    return get_spec("rtmdet-nano-person")


@pytest.fixture(scope="session")
def reference_model(reference, nano_spec):
    """RTMDet-nano-person with the reference checkpoint, eval mode (treat as read-only)."""
    from rtmbench.checkpoint import load_weights
    from rtmbench.model import RTMDet

    model = RTMDet(nano_spec).eval()
    load_weights(model, reference.checkpoint)
    return model


@pytest.fixture(scope="session")
def run_cli():
    """Run ``python -m rtmbench ARGS…`` in a subprocess (installed or not); returns the result."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

    def run(*args, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "rtmbench", *map(str, args)],
                                capture_output=True, text=True, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"rtmbench {' '.join(map(str, args))} exited {result.returncode}:\n"
                                 f"{result.stderr}")
        return result

    return run
