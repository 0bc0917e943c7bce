""":func:`rtmbench.data.preprocess.normalize_into` for one image, compiled with numba.

Bit-identical to the NumPy version: each channel's 256 possible results are computed with its
float32 arithmetic (the uint8 value cast to float32, minus the float32 mean, divided by the
float32 std) and looked up. One pass and one GIL release instead of two NumPy calls per channel:
the detection loop's decode threads contend for the GIL with a GPU engine's thread, and each
release costs a wait to get it back.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, error_model="numpy")
def normalize_image(image, out, table):
    """image uint8[H, W, C] → out float32[C, H, W] = table[c, image[y, x, c]]; table float32[C, 256]."""
    height, width, channels = image.shape
    for c in range(channels):  # plane by plane: contiguous writes (2x faster than pixel by pixel)
        for y in range(height):
            for x in range(width):
                out[c, y, x] = table[c, image[y, x, c]]
