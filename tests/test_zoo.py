"""The model zoo: entries made from a run, zoo:NAME wherever a checkpoint is taken, hash checks, the shipped models."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import melecole.zoo as zoo
from melecole.config import load_cfg
from melecole.engine.checkpoint import load_checkpoint, save_checkpoint
from melecole.errors import CheckpointError, DataError
from melecole.export.zoo_entry import dataset_info, make_zoo_entry, score_checkpoint
from melecole.models import build_model
from melecole.testing import make_tiny_train_opts

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # DATASET.DATA_ROOT of the shipped configs, from the repo root
VI_TOLERANCE = 0.02  # bits


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> dict:
    """A zoo folder with one entry 'tiny' made by make_zoo_entry from a random tiny model's checkpoint."""
    base = tmp_path_factory.mktemp("zoo")
    cfg = load_cfg(None, make_tiny_train_opts(base, **{"INFERENCE.MIN_SEGMENT_SIZE": "5"}))
    torch.manual_seed(0)
    model = build_model(cfg)
    checkpoint = base / "run" / "checkpoints" / "last.pt"
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(checkpoint, model=model, cfg=cfg, iteration=7, optimizer=optimizer)
    data = dataset_info("boxes", source="melecole.testing box volumes", licence="CC0-1.0", voxel_size=(30, 4, 4))
    folder = make_zoo_entry(checkpoint.parent.parent, "tiny", data, base / "data", config="tiny.yaml",
                            command="melecole-train --config tiny.yaml", description="a random tiny model",
                            root=base / "models")
    return {"root": base / "models", "folder": folder, "checkpoint": checkpoint, "cfg": cfg, "data": base / "data",
            "config": _write_config(cfg, base / "tiny.yaml")}


def _write_config(cfg, path: Path) -> Path:
    path.write_text(cfg.dump())
    return path


@pytest.fixture
def use_tiny_zoo(tiny_zoo, monkeypatch) -> dict:
    """The package's zoo folder replaced by the tiny one for this test."""
    monkeypatch.setattr(zoo, "MODELS_DIR", tiny_zoo["root"])
    return tiny_zoo


def test_entry_holds_reduced_weights_config_and_a_complete_manifest(tiny_zoo):
    folder = tiny_zoo["folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "manifest.yaml", "weights.pt"]
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]
    manifest = zoo.read_manifest(folder / "manifest.yaml")
    assert manifest["weights"]["sha256"] == zoo.file_sha256(folder / "weights.pt")
    assert manifest["weights"]["iteration"] == 7 and manifest["weights"]["dtype"] == "float32"
    assert manifest["data"]["licence"] == "CC0-1.0" and manifest["data"]["voxel_size_nm"] == [30.0, 4.0, 4.0]
    assert manifest["training"]["command"] == "melecole-train --config tiny.yaml"
    evaluation = manifest["evaluation"]
    assert evaluation["vi"] == pytest.approx(evaluation["vi_split"] + evaluation["vi_merge"], abs=2e-4)
    assert 0 <= evaluation["arand"] <= 1 and evaluation["command"].startswith("melecole-infer --config tiny.yaml")
    reduced = torch.load(folder / "weights.pt", weights_only=False)
    original = torch.load(tiny_zoo["checkpoint"], weights_only=False)
    assert reduced["optimizer"] is None and original["optimizer"] is not None
    assert (folder / "weights.pt").stat().st_size < tiny_zoo["checkpoint"].stat().st_size
    for name, value in original["model"].items():
        torch.testing.assert_close(reduced["model"][name], value, rtol=0, atol=0)
    assert (folder / "config.yaml").read_text() == original["config"]


def test_recorded_scores_are_those_of_the_stored_weights(tiny_zoo):
    recorded = zoo.read_manifest(tiny_zoo["folder"] / "manifest.yaml")["evaluation"]
    again = score_checkpoint(tiny_zoo["folder"] / "weights.pt", tiny_zoo["data"])
    assert again["vi"] == pytest.approx(recorded["vi"], abs=1e-4)
    assert again["arand"] == pytest.approx(recorded["arand"], abs=1e-4)


def test_zoo_name_loads_through_load_checkpoint(use_tiny_zoo):
    checkpoint = load_checkpoint("zoo:tiny")
    assert checkpoint["zoo"] == "tiny" and Path(checkpoint["path"]) == use_tiny_zoo["folder"] / "weights.pt"
    assert checkpoint["iteration"] == 7
    original = load_checkpoint(use_tiny_zoo["checkpoint"])
    assert "zoo" not in original
    for name, value in original["model"].items():
        torch.testing.assert_close(checkpoint["model"][name], value, rtol=0, atol=0)


def test_changed_weights_are_refused_before_loading(tiny_zoo, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(tiny_zoo["root"], root)
    monkeypatch.setattr(zoo, "MODELS_DIR", root)
    weights = root / "tiny" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"zoo model 'tiny': weights .* have SHA-256 .* expected .* from its manifest"):
        load_checkpoint("zoo:tiny")
    weights.unlink()
    with pytest.raises(DataError, match="weights file .* is missing"):
        zoo.resolve("zoo:tiny")


@pytest.mark.slow
def test_infer_with_an_unknown_zoo_name_is_one_line_with_exit_2(tiny_zoo, tmp_path):
    # Subprocesses: the commands as users run them (and run_cli's logging.shutdown() would close handlers that
    # other libraries imported by earlier tests bound to pytest's captured stderr).
    raw = tiny_zoo["data"] / "val" / "val.hdf"
    infer = subprocess.run(
        [sys.executable, "infer.py", "--config", str(tiny_zoo["config"]), "--checkpoint", "zoo:nope", "--input",
         str(raw), "--output-dir", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert infer.returncode == 2, infer.stderr
    expected = r"error: zoo model 'nope' does not exist, expected one of: .* \(melecole-zoo list shows them\)\n"
    assert re.fullmatch(expected, infer.stderr), infer.stderr
    assert not (tmp_path / "out").exists()


def test_zoo_show_of_an_unknown_name_is_one_line_with_exit_2():
    show = subprocess.run([sys.executable, "-m", "melecole.cli.zoo", "show", "nope"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 2 and show.stderr.startswith("error: zoo model 'nope' does not exist")
    assert show.stderr.count("\n") == 1 and not show.stdout


def test_broken_manifest_is_named(tmp_path):
    folder = tmp_path / "m1"
    folder.mkdir()
    (folder / "manifest.yaml").write_text(yaml.safe_dump({"format": zoo.MANIFEST_FORMAT, "name": "m1"}))
    with pytest.raises(DataError, match=r"manifest.yaml': no 'description' entry"):
        zoo.list_models(tmp_path)
    (folder / "manifest.yaml").write_text("[1, 2")
    with pytest.raises(DataError, match="could not be read"):
        zoo.list_models(tmp_path)


def test_zoo_list_and_show_print_the_table_and_manifest(use_tiny_zoo, capfd):
    from melecole.cli.zoo import main as zoo_main

    assert zoo_main(["list"]) == 0
    header, row = capfd.readouterr().out.strip().splitlines()
    assert header.split()[:5] == ["name", "data", "voxel", "nm", "VI"]
    manifest = zoo.read_manifest(use_tiny_zoo["folder"] / "manifest.yaml")
    assert row.split()[:5] == ["tiny", "boxes", "30x4x4", f"{manifest['evaluation']['vi']:.3f}",
                               f"{manifest['evaluation']['arand']:.3f}"]
    assert zoo_main(["show", "tiny"]) == 0
    out = capfd.readouterr().out
    assert yaml.safe_load(out)["weights"]["sha256"] == manifest["weights"]["sha256"]
    assert "SHA-256 matches the manifest" in out


def test_infer_whole_volume_with_a_zoo_name_reproduces_the_manifest(use_tiny_zoo, tmp_path, capfd):
    from melecole.cli.infer import main as infer_main

    code = infer_main(["--config", str(use_tiny_zoo["config"]), "--checkpoint", "zoo:tiny", "--split", "val",
                       "--output-dir", str(tmp_path / "out"), "DATASET.DATA_ROOT", str(use_tiny_zoo["data"])])
    out = capfd.readouterr().out
    assert code == 0, out
    recorded = zoo.read_manifest(use_tiny_zoo["folder"] / "manifest.yaml")["evaluation"]
    line = next(line for line in out.splitlines() if line.strip().startswith("segmentation:"))
    split, merge, arand = (float(line.split()[i]) for i in (3, 5, 7))
    assert split + merge == pytest.approx(recorded["vi"], abs=1e-3) and arand == pytest.approx(recorded["arand"],
                                                                                                 abs=1e-3)
    assert not list(use_tiny_zoo["folder"].glob("results"))  # nothing written into the zoo


def test_blockwise_prediction_plans_and_runs_a_zoo_model(use_tiny_zoo, tmp_path):
    from melecole.blockwise.predict import plan_prediction, predict_task, prepare_prediction
    from melecole.io import open_work_array

    raw = use_tiny_zoo["data"] / "val" / "val.hdf"
    job = plan_prediction(use_tiny_zoo["cfg"], "zoo:tiny", f"{raw}:volume", None, tmp_path / "work", 1,
                          chunk=(8, 32, 32))
    assert Path(job.checkpoint) == use_tiny_zoo["folder"] / "weights.pt"
    assert prepare_prediction(job, resume=False) == 0
    assert predict_task(job, 0) > 0
    block = open_work_array(job.affinities_url)[(slice(None), *job.plan.box(0))]
    assert np.asarray(block).any()


def test_fine_tuning_starts_from_the_zoo_weights(use_tiny_zoo, tmp_path):
    from melecole.engine.trainer import Trainer

    opts = make_tiny_train_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "1", "OPTIM.INITIAL_LR": "0.0001"})
    trainer = Trainer(load_cfg(None, opts), supervised_checkpoint="zoo:tiny")
    original = load_checkpoint(use_tiny_zoo["checkpoint"])["model"]
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=0)
    assert trainer.iteration == 0
    trainer.train()
    assert (trainer.run_dir / "checkpoints" / "last.pt").is_file()
    assert "initialised weights from" in (trainer.run_dir / "log.txt").read_text()


def test_resume_of_a_zoo_model_is_refused_in_one_line(use_tiny_zoo):
    from melecole.engine.trainer import Trainer, resume_config

    cfg, checkpoint = resume_config("zoo:tiny", ["DATASET.DATA_ROOT", str(use_tiny_zoo["data"])])
    with pytest.raises(CheckpointError, match="not inside a run folder of this library.*--supervised_checkpoint"):
        Trainer(cfg, resume_checkpoint=checkpoint)
    assert sorted(p.name for p in use_tiny_zoo["folder"].iterdir()) == ["config.yaml", "manifest.yaml", "weights.pt"]


def test_an_existing_entry_is_replaced_only_with_overwrite_and_only_if_it_is_an_entry(tiny_zoo, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_zoo["root"], root)
    data = dataset_info("boxes", source="s", licence="CC0-1.0", voxel_size=(1, 1, 1))
    keywords = dict(config="c.yaml", command="c", description="d", root=root)
    before = (root / "tiny" / "manifest.yaml").read_bytes()
    with pytest.raises(DataError, match="zoo entry .*tiny' exists, expected a new zoo name, or --overwrite"):
        make_zoo_entry(tiny_zoo["checkpoint"], "tiny", data, tiny_zoo["data"], **keywords)
    (root / "tiny" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds notes.txt"):
        make_zoo_entry(tiny_zoo["checkpoint"], "tiny", data, tiny_zoo["data"], overwrite=True, **keywords)
    assert (root / "tiny" / "manifest.yaml").read_bytes() == before and (root / "tiny" / "notes.txt").exists()
    (root / "tiny" / "notes.txt").unlink()
    make_zoo_entry(tiny_zoo["checkpoint"], "tiny", data, tiny_zoo["data"], overwrite=True, **keywords)
    assert zoo.read_manifest(root / "tiny" / "manifest.yaml")["training"]["config"] == "c.yaml"
    with pytest.raises(Exception, match="--name '../x'"):
        make_zoo_entry(tiny_zoo["checkpoint"], "../x", data, tiny_zoo["data"], **keywords)


# ----- the models shipped in melecole/zoo/models -----

SHIPPED = zoo.list_models()


def test_the_package_ships_zoo_models():
    names = [model.name for model in SHIPPED]
    assert "fib-gala-fibsem" in names, names


@pytest.mark.parametrize("model", SHIPPED, ids=[model.name for model in SHIPPED])
def test_shipped_weights_match_their_manifest(model):
    zoo.verify_weights(model)  # raises DataError on a mismatch
    checkpoint = load_checkpoint(f"zoo:{model.name}")
    assert checkpoint["optimizer"] is None and checkpoint["iteration"] == model.manifest["weights"]["iteration"]
    assert model.weights.stat().st_size < 1_000_000
    assert model.manifest["data"]["licence"] and len(model.manifest["data"]["voxel_size_nm"]) == 3
    assert (REPO_ROOT / model.manifest["training"]["config"]).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("model", SHIPPED, ids=[model.name for model in SHIPPED])
def test_shipped_models_reproduce_their_recorded_val_vi(model):
    data_root = SHARED_DATA / model.manifest["data"]["name"]
    if not data_root.is_dir():
        pytest.skip(f"real EM volumes not found at {data_root} (../shared/data is absent)")
    recorded = model.manifest["evaluation"]
    measured = score_checkpoint(model.weights, data_root, recorded["split"])
    assert abs(measured["vi"] - recorded["vi"]) <= VI_TOLERANCE, (measured, recorded)
    assert abs(measured["arand"] - recorded["arand"]) <= VI_TOLERANCE, (measured, recorded)
