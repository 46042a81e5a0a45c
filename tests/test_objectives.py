"""Training objectives: the registry agrees with config validation, selects and builds what the config asks for."""

from __future__ import annotations

import re

import pytest
import torch
from yacs.config import CfgNode as CN

from melecole.config import get_default_cfg, load_cfg
from melecole.config.validate import OBJECTIVE_SELECTION, objective_name
from melecole.errors import ConfigError
from melecole.losses import (
    OBJECTIVE_REGISTRY,
    ContrastiveObjective,
    MetricObjective,
    build_objective,
    get_objective_entry,
    selected_objective,
)
from melecole.losses.metric import build_metric_loss
from melecole.models import build_dense_moco, build_model

TINY = [
    "MODEL.INPUT_SIZE", "[8, 32, 32]", "MODEL.FILTERS", "[4, 8]", "MODEL.POOL_Z", "[False]",
    "MODEL.NORM_GROUPS", "2", "MODEL.EMBEDDING_DIMENSION", "4", "MOCO.QUEUE_SIZE", "40", "MOCO.NUM_SAMPLES", "8",
    "MOCO.PROJECTION_DIM", "8", "MOCO.PROJECTION_HIDDEN", "8", "LOSS.AFFINITY_WEIGHT", "0.5",
]  # fmt: skip


def selection_opts(name: str) -> list[str]:
    """KEY VALUE overrides that select the objective ``name``."""
    return [item for key, value in OBJECTIVE_SELECTION[name].items() for item in (key, str(value))]


def tiny_cfg(name: str, *extra: str) -> CN:
    return load_cfg(None, TINY + selection_opts(name) + list(extra))


def fixed_batch() -> dict:
    """Labelled patches and view pairs of the tiny config, the same on every call."""
    generator = torch.Generator().manual_seed(7)
    shape = (2, 1, 8, 32, 32)
    return {
        "raw": torch.rand(shape, generator=generator),
        "labels": torch.randint(0, 4, (2, 8, 32, 32), generator=generator),
        "view1": torch.rand(shape, generator=generator),
        "view2": torch.rand(shape, generator=generator),
        "coords1": torch.randint(0, 8, (2, 8, 3), generator=generator),
        "coords2": torch.randint(0, 8, (2, 8, 3), generator=generator),
        "view_groups": torch.randint(-1, 3, (2, 8), generator=generator),
    }


def test_registry_names_are_the_validators_objectives():
    assert list(OBJECTIVE_REGISTRY) == list(OBJECTIVE_SELECTION) == ["metric", "moco_joint", "moco_pretrain"]
    for name, entry in OBJECTIVE_REGISTRY.items():
        assert entry.name == name and entry.selected_by == OBJECTIVE_SELECTION[name]
        cfg = tiny_cfg(name)  # validated by load_cfg
        assert objective_name(cfg) == name and selected_objective(cfg) is entry


def test_moco_mode_choices_of_the_validator_are_the_registrys_modes():
    with pytest.raises(ConfigError) as caught:
        load_cfg(None, ["MOCO.MODE", "finetune"])
    message = str(caught.value)
    assert "\n" not in message
    listed = re.fullmatch(r"MOCO\.MODE must be one of (.*); got 'finetune'", message).group(1).split(", ")
    selections = [entry.selected_by for entry in OBJECTIVE_REGISTRY.values()]
    modes = [selection["MOCO.MODE"] for selection in selections if "MOCO.MODE" in selection]
    assert listed == modes == ["joint", "pretrain"]


def test_every_valid_moco_setting_selects_one_objective():
    for enabled in (False, True):
        for mode in ("joint", "pretrain"):
            cfg = load_cfg(None, ["MOCO.ENABLED", str(enabled), "MOCO.MODE", mode, "MODEL.NORM", "group"])
            expected = f"moco_{mode}" if enabled else "metric"
            assert objective_name(cfg) == expected


def test_unknown_objective_is_a_one_line_error_listing_the_choices():
    with pytest.raises(ConfigError) as caught:
        get_objective_entry("contrastive")
    message = str(caught.value)
    assert message == "unknown training objective 'contrastive'; valid: metric, moco_joint, moco_pretrain"
    cfg = get_default_cfg()  # not validated: a selection that no entry has
    cfg.MOCO.ENABLED, cfg.MOCO.MODE = True, "finetune"
    with pytest.raises(ConfigError) as caught:
        build_objective(cfg, torch.nn.Identity(), torch.device("cpu"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("MOCO.ENABLED True, MOCO.MODE 'finetune' select no")
    assert all(name in message for name in OBJECTIVE_REGISTRY)


def hand_assembled(name: str, cfg: CN, model: torch.nn.Module) -> MetricObjective:
    """The objective as composed before the registry existed, from the same parts."""
    criterion = build_metric_loss(cfg)
    if name == "metric":
        return MetricObjective(criterion)
    moco = build_dense_moco(cfg, model)
    return ContrastiveObjective(criterion, moco, weight=cfg.MOCO.WEIGHT, pretrain=name == "moco_pretrain")


@pytest.mark.parametrize("name", list(OBJECTIVE_REGISTRY))
@pytest.mark.parametrize("extra", [[], ["MOCO.SUPERVISED", "True", "MOCO.PROJECTION_INPUT", "embedding"]])
def test_registry_objective_gives_bit_identical_loss_on_a_fixed_batch(name, extra):
    cfg = tiny_cfg(name, *extra)
    results = []
    for make in (lambda m: build_objective(cfg, m, torch.device("cpu")), lambda m: hand_assembled(name, cfg, m)):
        torch.manual_seed(0)
        model = build_model(cfg)
        objective = make(model)
        steps = []
        for _ in range(2):  # the second step sees the momentum update and the queue of the first
            loss, terms = objective(model, fixed_batch())
            loss.backward()
            steps.append((loss.detach(), terms, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        results.append((type(objective), steps))
    (kind, steps), (expected_kind, expected_steps) = results
    assert kind is expected_kind is (MetricObjective if name == "metric" else ContrastiveObjective)
    for (loss, terms, grads), (expected_loss, expected_terms, expected_grads) in zip(steps, expected_steps):
        assert torch.isfinite(loss) and torch.equal(loss, expected_loss)
        assert terms.keys() == expected_terms.keys()
        assert all(torch.equal(terms[key], expected_terms[key]) for key in terms)
        assert len(grads) == len(expected_grads) > 0
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    assert ("moco_infonce" in terms) == (name != "metric") and ("metric" in terms) == (name != "moco_pretrain")


class RecordingNode(CN):
    """A config that records the full name of every value read by attribute."""

    reads: set = set()

    def __init__(self, init_dict=None, key_list=None, new_allowed=False):
        super().__init__(init_dict, key_list, new_allowed)
        self.__dict__["_path"] = ".".join(key_list or [])

    def __getattr__(self, name):
        value = super().__getattr__(name)
        if not isinstance(value, CN):
            RecordingNode.reads.add(f"{self._path}.{name}".lstrip("."))
        return value


def test_each_objective_reads_only_its_declared_config_keys():
    declared_and_read = set()
    for name, entry in OBJECTIVE_REGISTRY.items():
        for projection_input in ("features", "embedding"):
            cfg = tiny_cfg(name, "MOCO.PROJECTION_INPUT", projection_input)
            RecordingNode.reads = set()
            torch.manual_seed(0)
            entry.build(RecordingNode(cfg), build_model(cfg), torch.device("cpu"), 1)
            assert RecordingNode.reads, name
            for key in RecordingNode.reads:
                matches = [d for d in entry.keys if key == d or key.startswith(d + ".")]
                assert matches, f"{name} reads {key}, not among its keys {entry.keys}"
                declared_and_read.update((name, d) for d in matches)
    for name, entry in OBJECTIVE_REGISTRY.items():  # no key declared but never read
        assert {(name, d) for d in entry.keys} <= declared_and_read


@pytest.mark.parametrize(
    "name, loaders_made",
    [("metric", ["labelled"]), ("moco_joint", ["views", "labelled"]), ("moco_pretrain", ["views"])],
)
def test_training_loader_gives_the_batches_of_the_selected_objective(name, loaders_made, monkeypatch):
    from melecole import data
    from melecole.data import views
    from melecole.engine import loaders

    made = []
    labelled_batches, view_batches = [{"raw": 1, "labels": 2}] * 3, [{"view1": 3, "view2": 4}] * 3
    monkeypatch.setattr(data, "build_train_loader", lambda *a, **k: made.append("labelled") or labelled_batches)
    monkeypatch.setattr(views, "build_view_loader", lambda *a, **k: made.append("views") or view_batches)
    batches = list(loaders.build_training_loader(tiny_cfg(name)))
    assert made == loaders_made  # views first when both, as before the registry
    expected = {**(labelled_batches[0] if "labelled" in made else {}), **(view_batches[0] if "views" in made else {})}
    assert batches == [expected] * 3
    entry = OBJECTIVE_REGISTRY[name]
    assert (entry.labelled, entry.views) == ("labelled" in made, "views" in made)
