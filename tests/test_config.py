from pathlib import Path

import pytest

from melecole.config import load_cfg
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
