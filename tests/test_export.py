"""melecole-export: TorchScript, ONNX and bioimage.io packages of a checkpoint, checked against PyTorch; outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from melecole.config import load_cfg
from melecole.engine.checkpoint import save_checkpoint
from melecole.errors import ConfigError, DataError
from melecole.export.package import AFFINITY_TOLERANCE, MARKER_NAME, export_checkpoint, load_exported_model, run_onnx
from melecole.inference.affinities import embeddings_to_affinities
from melecole.models import build_model
from melecole.testing import make_tiny_train_opts

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny model's checkpoint in a run folder, with its data (the test window is a crop of val)."""
    base = tmp_path_factory.mktemp("export")
    cfg = load_cfg(None, make_tiny_train_opts(base, **{"MODEL.FILTERS": "[4, 8]", "MODEL.POOL_Z": "[True]"}))
    torch.manual_seed(0)
    checkpoint = base / "run" / "checkpoints" / "last.pt"
    save_checkpoint(checkpoint, model=build_model(cfg), cfg=cfg, iteration=5)
    return checkpoint


def _affinities(exported, embedding: np.ndarray) -> np.ndarray:
    settings = exported.affinity_settings
    return embeddings_to_affinities(embedding, settings["offsets"], settings["delta_d"], settings["norm"])


def test_torchscript_export_runs_without_the_project(tiny_checkpoint, tmp_path):
    summary = export_checkpoint(tiny_checkpoint, "torchscript", tmp_path / "ts")
    assert summary.files == ["model.torchscript.pt"] and summary.window == (8, 32, 32)
    assert summary.checks["torchscript_affinity_max_abs_diff"] <= AFFINITY_TOLERANCE
    marker = json.loads((tmp_path / "ts" / MARKER_NAME).read_text())
    assert marker["melecole"]["writer"] == "melecole" and marker["files"] == summary.files
    assert marker["affinities"]["offsets"][0] == [-1, 0, 0] and marker["test_window"].startswith("val.hdf [volume]")
    raw = np.random.default_rng(3).random((2, 1, 8, 32, 32), dtype=np.float32)
    np.save(tmp_path / "raw.npy", raw)
    # A plain interpreter: isolated mode (no PYTHONPATH, no working folder on the path) and any import of melecole
    # fails, so the module cannot lean on the project.
    script = (
        "import sys; sys.modules['melecole'] = None\n"
        "import numpy as np, torch\n"
        f"module = torch.jit.load({str(tmp_path / 'ts' / 'model.torchscript.pt')!r})\n"
        f"embedding, foreground = module(torch.from_numpy(np.load({str(tmp_path / 'raw.npy')!r})))\n"
        f"np.save({str(tmp_path / 'embedding.npy')!r}, embedding.detach().numpy())\n"
        "print(tuple(embedding.shape), tuple(foreground.shape), sys.modules['melecole'])\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 4, 8, 32, 32) (2, 1, 8, 32, 32) None"
    exported = load_exported_model(tiny_checkpoint)
    reference, _ = exported.reference(raw)
    np.testing.assert_allclose(np.load(tmp_path / "embedding.npy"), reference, atol=1e-5)


def test_onnx_runtime_gives_pytorchs_affinities(tiny_checkpoint, tmp_path):
    summary = export_checkpoint(tiny_checkpoint, "onnx", tmp_path / "onnx")
    assert summary.files == ["model.onnx"]
    assert summary.checks["onnx_affinity_max_abs_diff"] <= AFFINITY_TOLERANCE
    exported = load_exported_model(tiny_checkpoint)
    raw = np.random.default_rng(4).random((2, 1, 8, 32, 32), dtype=np.float32)  # another window, batch 2
    embedding, foreground = run_onnx(tmp_path / "onnx" / "model.onnx", raw)
    reference_embedding, reference_foreground = exported.reference(raw)
    for index in range(2):
        difference = np.abs(_affinities(exported, embedding[index]) - _affinities(exported, reference_embedding[index]))
        assert difference.max() <= AFFINITY_TOLERANCE
        assert _affinities(exported, reference_embedding[index]).std() > 0  # not a constant output
    np.testing.assert_allclose(foreground, reference_foreground, atol=1e-4)


@pytest.mark.slow
def test_bioimageio_package_validates_and_passes_the_core_test(tiny_checkpoint, tmp_path):
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    summary = export_checkpoint(tiny_checkpoint, "bioimageio", tmp_path / "bio")
    folder = tmp_path / "bio"
    assert set(summary.files) == {"bioimageio_test.md", "documentation.md", "rdf.yaml", "test_input.npy",
                                  "test_output_embedding.npy", "test_output_foreground.npy", "weights.onnx",
                                  "weights_torchscript.pt"}
    assert summary.checks["onnx_affinity_max_abs_diff"] <= AFFINITY_TOLERANCE
    description = load_description(folder / "rdf.yaml", perform_io_checks=True)
    assert description.validation_summary.status == "valid-format"
    assert set(description.weights.model_dump(exclude_none=True)) == {"torchscript", "onnx"}
    assert [tensor.id for tensor in description.outputs] == ["embedding", "foreground"]
    assert test_model(folder / "rdf.yaml").status == "passed"
    assert "| status          | passed" in (folder / "bioimageio_test.md").read_text()
    documentation = (folder / "documentation.md").read_text()
    assert "max(0, 1 - d / (2 * 1.5))^2" in documentation and "Mutex watershed" in documentation
    test_input = np.load(folder / "test_input.npy")
    assert test_input.shape == (1, 1, 8, 32, 32) and 0 <= test_input.min() and test_input.max() <= 1


def test_unknown_format_and_bad_window_are_config_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--format 'tflite' is not a known export format, expected one of: "
                                          "torchscript, onnx, bioimageio"):
        export_checkpoint(tiny_checkpoint, "tflite", tmp_path / "x")
    with pytest.raises(ConfigError, match=r"--window \[8, 31, 32\]: y 31 \(multiple of 2\) expected"):
        export_checkpoint(tiny_checkpoint, "onnx", tmp_path / "x", window=(8, 31, 32))
    assert not (tmp_path / "x").exists()


def test_cli_bad_input_is_one_line_with_exit_2(tiny_checkpoint, tmp_path):
    cases = (
        (["--checkpoint", str(tiny_checkpoint), "--format", "tflite"], "error: --format 'tflite' is not a known"),
        (["--checkpoint", "zoo:nope", "--format", "onnx"], "error: zoo model 'nope' does not exist"),
    )
    for arguments, start in cases:
        result = subprocess.run([sys.executable, "-m", "melecole.cli.export", *arguments, "--output",
                                 str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(start) and result.stderr.count("\n") == 1, result.stderr
        assert not (tmp_path / "out").exists()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_output_is_replaced_only_with_overwrite_and_only_if_it_is_an_export(tiny_checkpoint, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    before = _tree(user)
    for overwrite in (False, True):
        with pytest.raises(DataError, match="was not written by melecole-export .*holds: notes.txt"):
            export_checkpoint(tiny_checkpoint, "torchscript", user, overwrite=overwrite)
    assert _tree(user) == before
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is used as new
    export_checkpoint(tiny_checkpoint, "torchscript", out)
    with pytest.raises(DataError, match="holds an earlier export, expected a new folder, or --overwrite"):
        export_checkpoint(tiny_checkpoint, "onnx", out)
    (out / "mine.txt").write_text("user file")
    with pytest.raises(DataError, match=r"holds entries melecole-export did not write \(mine.txt\)"):
        export_checkpoint(tiny_checkpoint, "onnx", out, overwrite=True)
    (out / "mine.txt").unlink()
    export_checkpoint(tiny_checkpoint, "onnx", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "model.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        export_checkpoint(tiny_checkpoint, "onnx", file, overwrite=True)


def test_output_may_not_overlap_the_checkpoint(tiny_checkpoint):
    run = tiny_checkpoint.parent.parent
    before = _tree(run)
    for output in (tiny_checkpoint, tiny_checkpoint.parent, run):
        with pytest.raises(DataError, match=r"--output: .* (is|contains) the input --checkpoint"):
            export_checkpoint(tiny_checkpoint, "torchscript", output, overwrite=True)
    assert _tree(run) == before


@pytest.mark.parametrize("norm", [torch.nn.GroupNorm(2, 8), torch.nn.InstanceNorm3d(8, affine=True)])
def test_export_group_norm_equals_torchs_norm(norm):
    from melecole.models.export import ExportGroupNorm, _exact_norms

    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    holder = torch.nn.Sequential(norm)
    # A large offset: a one-pass E[x^2] - E[x]^2 would lose most digits of the variance here.
    x = torch.randn(2, 8, 6, 20, 24) * 0.5 + 40.0
    expected = holder.double()(x.double())  # float64: the reference both float32 versions are held to
    torch_error = (holder.float()(x) - expected).abs().max().item()
    _exact_norms(holder)
    assert isinstance(holder[0], ExportGroupNorm)
    error = (holder(x) - expected).abs().max().item()
    assert error < 1e-4 and error <= 2 * torch_error, (error, torch_error)


def test_onnx_runtime_group_norm_stays_exact_on_a_large_window():
    """ONNX Runtime's own GroupNorm sums a whole window in one float32 reduction; the exported one does not."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from melecole.models.export import onnx_bytes

    class Normed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.GroupNorm(2, 4)

        def forward(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
            features = self.norm(raw.expand(-1, 4, -1, -1, -1) * torch.arange(1.0, 5.0).reshape(1, 4, 1, 1, 1))
            return {"embedding": features, "foreground": features[:, :1]}

    model = Normed().eval()
    window = (32, 160, 160)  # 0.8 M voxels per channel
    session = onnxruntime.InferenceSession(onnx_bytes(model, window), providers=["CPUExecutionProvider"])
    raw = torch.rand(1, 1, *window) * 0.1 + 0.9
    embedding = session.run(None, {session.get_inputs()[0].name: raw.numpy()})[0]
    with torch.no_grad():
        expected = model(raw)["embedding"].numpy()
    np.testing.assert_allclose(embedding, expected, atol=1e-4, rtol=0)


def test_bioimageio_documentation_states_the_configs_segmentation_steps():
    from melecole.config import load_cfg
    from melecole.export.bioimageio import _segmentation_steps

    plain = _segmentation_steps(load_cfg(None))
    assert "min(foreground" not in plain and "Agglomeration" not in plain
    assert "3. **Clean-up**: segments under 20 voxels" in plain and "watershed of the segments" in plain
    assert "nearest segment" in _segmentation_steps(load_cfg(None, ["INFERENCE.FILL_MODE", "nearest"]))
    assert "stay 0" in _segmentation_steps(load_cfg(None, ["INFERENCE.FILL_BACKGROUND", "False"]))
    shipped = _segmentation_steps(load_cfg(str(Path(__file__).resolve().parents[1] / "configs/medulla-UNet3D.yaml")))
    assert "min(foreground of its two voxels)^3;" in shipped and "below 0.98 are" in shipped
    assert "3. **Agglomeration**" in shipped and "(gasp_signed,\n   threshold 0.6)" in shipped
    assert "4. **Clean-up**: segments under 300 voxels" in shipped
    assert "watershed of the segments on 1 - foreground" in shipped
