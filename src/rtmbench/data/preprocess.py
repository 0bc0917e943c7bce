"""mmdet's RTMDet test pipeline as pure NumPy/OpenCV functions.

LoadImageFromFile (cv2, BGR) → Resize(keep_ratio=True) → Pad(pad_val=114, right/bottom)
→ DetDataPreprocessor (mean/std, BGR kept) → NCHW float32.
"""

from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """What postprocessing needs to map boxes back to the original image.

    ``ori_shape``: (height, width) of the decoded image; ``scale_factor``: (sx, sy) = resized /
    original size per axis, as mmdet records it (the two differ slightly by rounding).
    """

    ori_shape: tuple[int, int]
    scale_factor: tuple[float, float]


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes → uint8[H, W, 3] BGR, exactly as mmcv's ``imfrombytes(flag='color')``.

    Raises ValueError when OpenCV cannot decode the bytes.
    """
    if not data:  # cv2.imdecode asserts on an empty buffer instead of returning None
        raise ValueError("cannot decode image (empty file)")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # e.g. a header claiming more pixels than OpenCV allows
        raise ValueError(f"cannot decode image (OpenCV: {exc.err})") from None
    if img is None:
        raise ValueError("cannot decode image (corrupt or unsupported format)")
    return img


def letterbox(img: np.ndarray, size: tuple[int, int] = (320, 320),
              pad_value: int = 114) -> tuple[np.ndarray, ImageMeta]:
    """Keep-ratio resize to fit ``size`` = (height, width), then pad right and bottom. ``size``
    is square, as every ModelSpec's (the scale rule below would overflow a non-square one).

    img: uint8[H, W, 3]. Scale = min(long_target / long_side, short_target / short_side) as
    mmcv's ``imrescale``; each side rounds as ``int(x * scale + 0.5)``, at least 1 (mmcv fails
    on a side that rounds to 0, as 1×4000 does); bilinear interpolation.
    Returns uint8[size[0], size[1], 3] and the image's :class:`ImageMeta`.
    """
    h, w = img.shape[:2]
    scale = min(max(size) / max(h, w), min(size) / min(h, w))
    new_w, new_h = max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    padded = np.full((size[0], size[1], 3), pad_value, dtype=np.uint8)
    padded[:new_h, :new_w] = resized[:size[0], :size[1]]
    return padded, ImageMeta((h, w), (new_w / w, new_h / h))


def normalize_into(images: np.ndarray, out: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """uint8[..., H, W, C] (channel order kept) → ``out`` float32[..., C, H, W] = (x - mean) / std.

    Divides, as mmdet does: multiplying by 1/std is 1 ULP off, which ill-conditioned weights
    amplify. One image or a batch: numba's kernel when installed (bit-identical, one pass);
    otherwise one channel plane at a time: contiguous writes, 4× faster than a transposed copy.
    """
    kernel = _compiled_kernel()
    if kernel is not None and images.ndim == out.ndim and images.ndim in (3, 4):
        batch = images.ndim == 4
        kernel(images if batch else images[None], out if batch else out[None],
               _lookup_table(tuple(mean), tuple(std)))
        return
    _normalize_numpy(images, out, mean, std)


def _normalize_numpy(images, out, mean, std) -> None:
    for c in range(images.shape[-1]):
        plane = out[..., c, :, :]
        np.subtract(images[..., c], np.float32(mean[c]), out=plane)
        np.divide(plane, np.float32(std[c]), out=plane)


@functools.cache
def _compiled_kernel():
    """numba's :func:`~rtmbench.data.preprocess_kernel.normalize_images`, or None without numba."""
    try:
        from .preprocess_kernel import normalize_images
    except ImportError:
        return None
    return normalize_images


@functools.cache
def _lookup_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32[C, 256]: every uint8 value of each channel normalized as :func:`_normalize_numpy` does."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None, None], (256, 1, 1, len(mean)))
    table = np.empty((256, len(mean), 1, 1), np.float32)
    _normalize_numpy(values, table, mean, std)
    return np.ascontiguousarray(table[:, :, 0, 0].T)


def normalize(batch: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8[B, H, W, C] → float32[B, C, H, W], as :func:`normalize_into`."""
    out = np.empty((batch.shape[0], batch.shape[3], *batch.shape[1:3]), np.float32)
    normalize_into(batch, out, mean, std)
    return out
