"""Raw intensities -> model input in [0, 1]: the one normaliser of MeLeCoLe.

Training patches (:mod:`melecole.data`), whole-volume and chunked inference all map raw to
[0, 1] here. uint8 is divided by 255; floats already in [0, 1] stay; any other range is mapped with
the volume's (low, high) intensity range, computed once per volume so that every patch or block
shares one scale.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from melecole.errors import DataError

__all__ = ["intensity_range", "model_input", "normalize_raw"]

# uint8 -> float32 / 255 by table look-up (exact 0 and 1, faster than arithmetic).
_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def intensity_range(raw: np.ndarray) -> tuple[float, float]:
    """Intensities that map to 0 and 1: the uint8 range, else the data's min and max.

    Floats already inside [0, 1] keep (0, 1). Other integer types (uint16 with 12-bit data, ...)
    use the data's range rather than the dtype's, which would leave them nearly black.
    """
    if raw.dtype == np.uint8:
        return 0.0, 255.0
    if raw.dtype == np.bool_:
        return 0.0, 1.0
    if raw.size == 0:
        return 0.0, 1.0
    low, high = float(np.min(raw)), float(np.max(raw))
    if np.issubdtype(raw.dtype, np.floating) and low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    if high <= low:
        return low, low + 1.0
    return low, high


def normalize_raw(raw: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Raw intensities -> float32 in [0, 1].

    Args:
        raw: any shape; uint8 is divided by 255.
        value_range: (low, high) mapped to (0, 1), values outside are clipped. None: the uint8
            range for uint8, otherwise the data's own min/max (:func:`intensity_range`).
    """
    if value_range is None:
        value_range = intensity_range(raw)
    low, high = (float(v) for v in value_range)
    if raw.dtype == np.uint8 and (low, high) == (0.0, 255.0):
        return _UINT8_TO_UNIT[raw]
    scaled = (raw.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def model_input(raw: np.ndarray, value_range: Sequence[float] | None = None) -> np.ndarray:
    """What the sliding-window predictor takes: uint8 (divided by 255 on the device, so only bytes
    travel there) or float32 in [0, 1].

    Args:
        raw: (Z, Y, X) intensities.
        value_range: (low, high) of the whole volume; None: uint8 and floats in [0, 1] pass as they
            are, other dtypes are refused (a block of a larger volume cannot know the volume's range).

    Raises:
        DataError: ``value_range`` is None and the dtype is neither uint8 nor float.
    """
    if value_range is None:
        if raw.dtype == np.uint8 or np.issubdtype(raw.dtype, np.floating):
            return raw
        raise DataError(
            f"raw of dtype {raw.dtype}: pass value_range=(low, high) to map it to [0, 1] "
            "(chunked prediction cannot scan the whole volume for its range)"
        )
    if raw.dtype == np.uint8 and tuple(float(v) for v in value_range) == (0.0, 255.0):
        return raw
    return normalize_raw(raw, (float(value_range[0]), float(value_range[1])))
