"""melecole.demo (what `make demo` runs): train -> infer the val split -> the comparison table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from melecole.cli import demo


@pytest.mark.slow
def test_demo_trains_infers_and_prints_the_table(tmp_path: Path, tiny_train_opts, capsys) -> None:
    opts = tiny_train_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "4", "LOG.RUN_NAME": "tiny-demo"})
    assert demo.main(["--config", "configs/synthetic-UNet3D.yaml", *opts]) == 0
    out = capsys.readouterr().out
    assert "tiny-demo: val volume val.hdf" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = {line[:32].strip(): line[32:].split() for line in lines[header + 2 : header + 4]}
    assert set(rows) == {"embeddings + MWS", next(name for name in rows if name.startswith("CC baseline (best t="))}
    for values in rows.values():
        split, merge, total, arand = (float(v) for v in values[:4])
        assert split >= 0 and merge >= 0 and math.isclose(total, split + merge, abs_tol=2e-4) and 0 <= arand <= 1
    json_path = Path(next(line for line in lines if line.startswith("scores written to")).split(" to ", 1)[1])
    written = json.loads(json_path.read_text())
    mws = written["scores"]["embeddings + MWS"]
    assert float(rows["embeddings + MWS"][2]) == pytest.approx(mws["vi_total"], abs=1e-4)
    assert set(written["timings_s"]) >= {"data", "train", "infer", "evaluate"}

    # --checkpoint skips training and reuses the cached predictions: the same table.
    checkpoint = json_path.parents[2] / "checkpoints" / "last.pt"
    assert demo.main(["--config", "configs/synthetic-UNet3D.yaml", "--checkpoint", str(checkpoint), *opts]) == 0
    again = capsys.readouterr().out
    assert "embeddings + MWS" in again and "train" not in json.loads(json_path.read_text())["timings_s"]
    assert lines[header + 2] in again.splitlines()


def test_synthetic_data_is_generated_only_for_a_missing_synthetic_root(tmp_path: Path, box_volume) -> None:
    assert not demo.ensure_synthetic_data(str(tmp_path / "fib-gala"))  # not the synthetic set: left alone
    assert not (tmp_path / "fib-gala").exists()
    for split in ("train", "val"):
        box_volume(tmp_path / "synthetic" / split / f"{split}.hdf")
    assert not demo.ensure_synthetic_data(str(tmp_path / "synthetic"))  # present: not regenerated
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == ["train", "val"]
