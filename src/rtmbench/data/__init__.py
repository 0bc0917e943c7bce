"""Image decoding and mmdet-exact preprocessing; COCO-layout datasets."""

from .preprocess import ImageMeta, decode_image, letterbox, normalize

__all__ = ["ImageMeta", "decode_image", "letterbox", "normalize"]
