"""Cost of identifying an inference input by content (SHA-256 of the raw) instead of size + mtime.

    python bench/bench_input_hash.py [--shape 100 1024 1024]

infer.py reads the whole raw anyway (melecole.data.volume.read_volume); the cache key now hashes the
raw's bytes (melecole.inference.inputs.raw_identity). The table compares the hash with that read
(the reference, measured in the same run) and with the old stat() identity. Median of 3.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from melecole.data.volume import read_volume
from melecole.inference.inputs import raw_identity


def _median_seconds(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[100, 1024, 1024])
    args = parser.parse_args()
    raw = np.random.default_rng(0).integers(0, 256, args.shape, dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "raw.hdf"
        with h5py.File(path, "w") as handle:
            handle.create_dataset("volume", data=raw, chunks=(16, 128, 128))
        read = _median_seconds(lambda: read_volume(path, label_key=None))
        digest = _median_seconds(lambda: raw_identity(raw))
        stat = _median_seconds(lambda: (path.stat().st_size, path.stat().st_mtime_ns))
    megabytes = raw.nbytes / 2**20
    print(f"raw {tuple(args.shape)} uint8 ({megabytes:.0f} MiB), median of 3")
    print(f"{'step':<40}{'seconds':>10}{'MiB/s':>10}{'x read':>9}")
    print("-" * 69)
    rows = [("read_volume (reference)", read), ("SHA-256 of the raw (new key)", digest)]
    rows.append(("stat size + mtime (old key)", stat))
    for name, seconds in rows:
        print(f"{name:<40}{seconds:>10.4f}{megabytes / max(seconds, 1e-9):>10.0f}{seconds / read:>9.3f}")


if __name__ == "__main__":
    main()
