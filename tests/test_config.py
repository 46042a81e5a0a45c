import re
from pathlib import Path

import pytest

from melecole.config import apply_overrides, cfg_from_yaml_text, check_inference_windows, load_cfg
from melecole.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_validate_and_freeze():
    cfg = load_cfg()
    assert cfg.is_frozen()
    assert cfg.MODEL.INPUT_SIZE == [20, 128, 128]
    assert len(cfg.INFERENCE.OFFSETS) == 12


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_cfg(path)
    assert cfg.LOG.RUN_NAME == path.stem


def test_overrides_and_int_for_float(tmp_path):
    cfg = load_cfg(None, ["OPTIM.INITIAL_LR", "1", "MODEL.FILTERS", "[8, 16]", "MODEL.POOL_Z", "[False]",
                          "MODEL.INPUT_SIZE", "[8, 32, 32]", "HARDWARE.AMP", "false"])
    assert cfg.OPTIM.INITIAL_LR == 1.0 and isinstance(cfg.OPTIM.INITIAL_LR, float)
    assert cfg.MODEL.FILTERS == [8, 16]
    assert cfg.HARDWARE.AMP is False


def test_unknown_key_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  FILTRES: [8, 16]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown config key 'MODEL.FILTRES'.*MODEL.FILTERS"):
        load_cfg(path)
    with pytest.raises(ConfigError, match="command-line override: unknown config key 'OPTIM.LR'"):
        load_cfg(None, ["OPTIM.LR", "0.1"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("MODEL:\n  FILTERS: [8, 16\nLOSS:\n  NORM: l2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml': YAML syntax error at line \d+"):
        load_cfg(path)


def test_wrong_type_and_choice(tmp_path):
    with pytest.raises(ConfigError, match="OPTIM.TOTAL_ITER expects int"):
        load_cfg(None, ["OPTIM.TOTAL_ITER", "'many'"])
    with pytest.raises(ConfigError, match="LOSS.NORM must be one of l1, l2"):
        load_cfg(None, ["LOSS.NORM", "l3"])
    with pytest.raises(ConfigError, match="MODEL.POOL_Z needs one entry per downsampling"):
        load_cfg(None, ["MODEL.FILTERS", "[8, 16]"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' not found"):
        load_cfg(tmp_path / "nope.yaml")


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("OPTIM:\n  TOTAL_ITER: 7\n  BATCH_SIZE: 3\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nOPTIM:\n  BATCH_SIZE: 5\n")
    cfg = load_cfg(tmp_path / "child.yaml")
    assert (cfg.OPTIM.TOTAL_ITER, cfg.OPTIM.BATCH_SIZE) == (7, 5)
    assert cfg.LOG.RUN_NAME == "child"


# Every value below used to be accepted (or crashed later, e.g. LOG.LOG_FREQUENCY 0 with
# ZeroDivisionError); each must now be refused when the config is read, naming the key.
BAD_VALUES = [
    ("LOG.LOG_FREQUENCY", "0", "LOG.LOG_FREQUENCY: got 0, expected a value >= 1"),
    ("LOG.CHECKPOINT_FREQUENCY", "-5", "LOG.CHECKPOINT_FREQUENCY: got -5, expected a value >= 0"),
    ("LOG.VAL_FREQUENCY", "-1", "LOG.VAL_FREQUENCY: got -1"),
    ("LOG.VAL_PATCHES", "0", "LOG.VAL_PATCHES: got 0"),
    ("LOG.PROGRESS_BAR", "sometimes", "LOG.PROGRESS_BAR must be one of auto, true, false"),
    ("LOG.RUN_NAME", "a/b", "LOG.RUN_NAME: got 'a/b'"),
    ("MODEL.NORM_GROUPS", "0", "MODEL.NORM_GROUPS: got 0, expected a value >= 1"),
    ("MODEL.NORM_GROUPS", "-4", "MODEL.NORM_GROUPS: got -4, expected a value >= 1"),
    ("OPTIM.WARMUP_ITER", "-5", "OPTIM.WARMUP_ITER: got -5, expected a value >= 0"),
    ("OPTIM.GRAD_CLIP", "-1", "OPTIM.GRAD_CLIP: got -1.0"),
    ("OPTIM.STEP_SIZE", "0", "OPTIM.STEP_SIZE: got 0"),
    ("DATASET.MIN_LABELED_FRACTION", "5", r"DATASET.MIN_LABELED_FRACTION: got 5.0, expected a value in \[0.0, 1.0\]"),
    ("DATASET.MAX_REDRAWS", "-1", "DATASET.MAX_REDRAWS: got -1"),
    ("HARDWARE.NUM_THREADS", "-3", "HARDWARE.NUM_THREADS: got -3, expected a value >= 0"),
    ("INFERENCE.MIN_SEGMENT_SIZE", "-5", "INFERENCE.MIN_SEGMENT_SIZE: got -5, expected a value >= 0"),
    ("INFERENCE.MWS_FOREGROUND_POWER", "-1", "INFERENCE.MWS_FOREGROUND_POWER: got -1.0, expected a value >= 0"),
    ("INFERENCE.OFFSETS", "[[0, 0, 0], [0, -1, 0], [0, 0, -1]]", r"INFERENCE.OFFSETS: got the zero offset \[0, 0, 0\]"),
    ("INFERENCE.OFFSETS", "[[-1.5, 0, 0], [0, -1, 0], [0, 0, -1]]", "INFERENCE.OFFSETS: got .*integer triplets"),
    ("INFERENCE.OFFSETS", "[[-1, 0, 0], [0, -5, 0], [0, 0, -5]]", "INFERENCE.OFFSETS: got .* 3 nearest-neighbour"),
    ("INFERENCE.OFFSETS", "[[-1, 0, 0], [0, -1, 0]]", "INFERENCE.OFFSETS: got .* 3 nearest-neighbour"),
    ("INFERENCE.STRIDE", "[20, 64, 64]", "INFERENCE.STRIDE/INFERENCE.MARGIN: .*z: stride 20"),
    ("INFERENCE.WINDOW_SIZE", "[20, 100, 128]", r"INFERENCE.WINDOW_SIZE \[20, 100, 128\] must be divisible"),
    ("MOCO.QUEUE_SIZE", "0", "MOCO.QUEUE_SIZE: got 0, expected a value >= 1"),
    ("MOCO.NUM_SAMPLES", "0", "MOCO.NUM_SAMPLES: got 0"),
    ("MOCO.PROJECTION_HIDDEN", "-1", "MOCO.PROJECTION_HIDDEN: got -1"),
    ("MOCO.PROJECTION_INPUT", "pixels", "MOCO.PROJECTION_INPUT must be one of features, embedding"),
    ("MOCO.MAX_SHIFT", "[1, 2]", r"MOCO.MAX_SHIFT: got \[1, 2\], expected 3 integers"),
    ("MOCO.WEIGHT", "-0.1", "MOCO.WEIGHT: got -0.1"),
    ("AUGMENTATION.NOISE.P", "1.5", r"AUGMENTATION.NOISE.P: got 1.5, expected a probability in \[0, 1\]"),
    ("AUGMENTATION.ELASTIC.SIGMA", "0", r"AUGMENTATION.ELASTIC.SIGMA: got 0.0, expected a value in \(0.0, inf\)"),
    ("AUGMENTATION.MISSING_PARTS.SIZE", "1.5", r"AUGMENTATION.MISSING_PARTS.SIZE: got 1.5, .* \(0.0, 1.0\]"),
    ("AUGMENTATION.MOTION_BLUR.KERNEL_SIZE", "0", "AUGMENTATION.MOTION_BLUR.KERNEL_SIZE: got 0"),
    ("AUGMENTATION.CUT_BLUR.DOWN_RATIO", "[0.5, 2.0]", r"AUGMENTATION.CUT_BLUR.DOWN_RATIO: got \[0.5, 2.0\]"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_values_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_cfg(None, [key, value])


def test_bad_values_give_one_line_errors_through_train_cli(capsys):
    from melecole.cli.train import train_main

    for key, value, message in BAD_VALUES:
        assert train_main(["--config", str(CONFIGS[0]), key, value]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), lines
        assert re.search(message, lines[0]), lines


def test_moco_with_batch_norm_is_refused_only_when_enabled():
    assert load_cfg(None, ["MODEL.NORM", "batch"]).MODEL.NORM == "batch"
    with pytest.raises(ConfigError, match="MOCO.ENABLED needs MODEL.NORM group, instance or none"):
        load_cfg(None, ["MODEL.NORM", "batch", "MOCO.ENABLED", "True"])


def test_string_keys_take_numbers_as_names(tmp_path):
    assert load_cfg(None, ["LOG.RUN_NAME", "2024"]).LOG.RUN_NAME == "2024"
    assert load_cfg(None, ["LOG.RUN_NAME", "1e3"]).LOG.RUN_NAME == "1e3"  # the text as typed
    path = tmp_path / "named.yaml"
    path.write_text("LOG:\n  RUN_NAME: 2024\n  PROGRESS_BAR: false\n")
    cfg = load_cfg(path)
    assert (cfg.LOG.RUN_NAME, cfg.LOG.PROGRESS_BAR) == ("2024", "false")
    assert load_cfg(None, ["LOG.PROGRESS_BAR", "False"]).LOG.PROGRESS_BAR == "false"
    # and the dumped config reads back to the same values
    assert "RUN_NAME: '2024'" in cfg.dump() and cfg_from_yaml_text(cfg.dump()).dump() == cfg.dump()


def test_check_inference_windows_returns_the_plan():
    cfg = load_cfg(None, ["INFERENCE.MARGIN", "[1, 8, 8]"])
    assert check_inference_windows(cfg) == ([20, 128, 128], None, [1, 8, 8])
    cfg = load_cfg(None, ["INFERENCE.STRIDE", "[10, 64, 64]", "INFERENCE.WINDOW_SIZE", "[20, 128, 128]"])
    assert check_inference_windows(cfg) == ([20, 128, 128], [10, 64, 64], [1, 4, 4])


def test_apply_overrides_returns_a_validated_frozen_copy():
    cfg = load_cfg()
    changed = apply_overrides(cfg, ["OPTIM.TOTAL_ITER", "7"])
    assert changed.OPTIM.TOTAL_ITER == 7 and cfg.OPTIM.TOTAL_ITER == 100000 and changed.is_frozen()
    with pytest.raises(ConfigError, match="LOG.LOG_FREQUENCY: got 0"):
        apply_overrides(cfg, ["LOG.LOG_FREQUENCY", "0"])


def test_non_text_config_file_is_named(tmp_path):
    path = tmp_path / "volume.hdf"
    path.write_bytes(b"\x89HDF\r\n\x1a\n\x00\x00\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=r"config file '.*volume.hdf': not a text \(UTF-8 YAML\) file"):
        load_cfg(path)


def test_flag_after_overrides_is_named():
    with pytest.raises(ConfigError, match="got the option '--resume' among the KEY VALUE pairs"):
        load_cfg(None, ["OPTIM.TOTAL_ITER", "3", "--resume", "runs/x"])
    with pytest.raises(ConfigError, match="got the option '--supervised_checkpoint' among"):
        load_cfg(None, ["OPTIM.TOTAL_ITER", "3", "--supervised_checkpoint"])


def test_stored_config_that_is_not_a_mapping_is_named():
    with pytest.raises(ConfigError, match="run/config.yaml: got str 'mine', expected a mapping of config groups"):
        cfg_from_yaml_text("mine\n", source="run/config.yaml")


def test_a_window_size_override_may_switch_between_auto_and_a_list():
    """configs/fib-gala-UNet3D.yaml says WINDOW_SIZE auto; the command line may give a list, and back."""
    overrides = ["INFERENCE.WINDOW_SIZE", "[24, 64, 64]", "INFERENCE.STRIDE", "[12, 32, 32]"]
    cfg = load_cfg("configs/fib-gala-UNet3D.yaml", overrides)
    assert cfg.INFERENCE.WINDOW_SIZE == [24, 64, 64] and cfg.INFERENCE.STRIDE == [12, 32, 32]
    assert load_cfg("configs/fib-gala-UNet3D.yaml", ["INFERENCE.WINDOW_SIZE", "auto"]).INFERENCE.WINDOW_SIZE == "auto"
    with pytest.raises(ConfigError, match="INFERENCE.WINDOW_SIZE"):
        load_cfg("configs/fib-gala-UNet3D.yaml", ["INFERENCE.WINDOW_SIZE", "[24, 64]"])
