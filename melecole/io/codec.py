"""Storage codec of probabilities (affinities, foreground): uint8 round(255 p) or a float dtype.

Writers encode, every reader decodes: the segmentation algorithms take either (they decode what they
read) and the stored float16 / float32 / uint8 volumes all give float32 in [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["encode_probabilities", "decode_probabilities"]


def encode_probabilities(values: np.ndarray, dtype: Any) -> np.ndarray:
    """Probabilities in [0, 1] -> ``dtype``: uint8 stores round(255 p), floats are cast."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.rint(np.clip(values.astype(np.float32, copy=False), 0.0, 1.0) * 255.0).astype(np.uint8)
    return values.astype(dtype, copy=False)


def decode_probabilities(values: np.ndarray) -> np.ndarray:
    """Stored probabilities -> float32 in [0, 1]: uint8 round(255 p) is scaled back, floats are cast."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values.astype(np.float32) * np.float32(1.0 / 255.0)
    return values.astype(np.float32, copy=False)
