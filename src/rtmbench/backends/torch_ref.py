"""PyTorch eager FP32: the reference every other engine is compared with. Nothing to build."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model import OUTPUT_NAMES
from .base import Backend, BackendUnavailable, Engine, ModelSource


class TorchEngine(Engine):
    computes_on_host_cores = True

    def __init__(self, model, precision: str):
        super().__init__(precision)
        import torch

        self._torch = torch
        self.model = model.eval()

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            outputs = self.model(self._torch.from_numpy(batch))
        return {name: out.numpy() for name, out in zip(OUTPUT_NAMES, outputs)}

    def describe(self) -> dict:
        return {**super().describe(), "threads": self._torch.get_num_threads()}


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32",)
    artifact_suffix = None
    runs_onnx = False
    install_hint = "pip install torch==2.13.0"

    @classmethod
    def sdk_version(cls) -> str:
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailable(f"torch is not installed ({exc}); {cls.install_hint}") from None
        return str(torch.__version__)

    def load(self, source: ModelSource, artifact: Path | None, precision: str, batch: int) -> Engine:
        from ..checkpoint import load_weights
        from ..model import RTMDet

        self.check_precision(precision)
        model = RTMDet(source.spec)
        if source.weights is not None:
            load_weights(model, source.weights)
        return TorchEngine(model, precision)
