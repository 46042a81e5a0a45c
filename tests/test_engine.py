"""Training engine: exact resume, checkpoints, run folder, bad input through train.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from melecole.config import load_cfg
from melecole.engine.checkpoint import load_checkpoint
from melecole.engine.optim import lr_factor
from melecole.engine.trainer import Trainer, resume_config
from melecole.errors import CheckpointError, DataError
from melecole.testing import make_tiny_train_opts as tiny_opts
from melecole.testing import write_box_volume as write_volume

REPO = Path(__file__).resolve().parents[1]


def test_lr_schedule_shapes():
    cosine = [lr_factor(i, schedule="cosine", total_iterations=100, warmup_iterations=10) for i in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[10] == pytest.approx(1.0) and cosine[-1] < 0.01
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    assert lr_factor(25, schedule="step", total_iterations=100, step_size=10, step_gamma=0.5) == 0.25


def test_train_writes_run_folder_and_loss_decreases(tmp_path):
    cfg = load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "30", "OPTIM.INITIAL_LR": "0.01"}))
    trainer = Trainer(cfg)
    history = trainer.train(keep_history=True)
    run = trainer.run_dir
    assert run.parent == tmp_path / "runs" and run.name.startswith("run-")
    for name in ("config.yaml", "log.txt", "checkpoints/last.pt", "checkpoints/iter_30.pt", "checkpoints/iter_3.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert load_cfg(run / "config.yaml").MODEL.FILTERS == [4, 8]
    assert len(history) == 30
    first = np.mean([h["loss"] for h in history[:5]])
    last = np.mean([h["loss"] for h in history[-5:]])
    assert last < first
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["iteration"] == 30
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    assert "val iter" in (run / "log.txt").read_text()
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(tmp_path, workers):
    opts = tiny_opts(tmp_path, **{"HARDWARE.NUM_WORKERS": str(workers), "OPTIM.TOTAL_ITER": "6"})
    reference = Trainer(load_cfg(None, opts), run_dir=tmp_path / "reference")
    reference_history = reference.train(keep_history=True)

    interrupted = Trainer(load_cfg(None, opts), run_dir=tmp_path / "interrupted")
    interrupted.train(stop_at=3)  # checkpoint at iteration 3 (LOG.CHECKPOINT_FREQUENCY)
    cfg, checkpoint = resume_config(tmp_path / "interrupted" / "checkpoints" / "iter_3.pt")
    resumed = Trainer(cfg, resume_checkpoint=checkpoint)
    assert resumed.iteration == 3 and resumed.run_dir == (tmp_path / "interrupted").resolve()
    resumed_history = resumed.train(keep_history=True)
    for (name, expected), actual in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-7, msg=name)
    assert reference.optimizer.param_groups[0]["lr"] == pytest.approx(resumed.optimizer.param_groups[0]["lr"])
    assert [h["loss"] for h in reference_history[3:]] == pytest.approx([h["loss"] for h in resumed_history], abs=1e-6)


def test_supervised_checkpoint_shape_mismatch_lists_keys(tmp_path):
    trainer = Trainer(load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "1"})))
    trainer.train()
    checkpoint = trainer.run_dir / "checkpoints" / "last.pt"
    other = load_cfg(None, tiny_opts(tmp_path, **{"MODEL.EMBEDDING_DIMENSION": "6", "MODEL.FILTERS": "[4, 16]"}))
    with pytest.raises(CheckpointError, match=r"MODEL.FILTERS: checkpoint \[4, 8\] vs config \[4, 16\].*"
                                              r"MODEL.EMBEDDING_DIMENSION: checkpoint 4 vs config 6"):
        Trainer(other, supervised_checkpoint=checkpoint)
    # same shape, different learning rate: allowed, weights are copied
    same = load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.INITIAL_LR": "0.0001"}))
    fine_tune = Trainer(same, supervised_checkpoint=checkpoint)
    for expected, actual in zip(trainer.model.state_dict().values(), fine_tune.model.state_dict().values()):
        torch.testing.assert_close(actual, expected)
    assert fine_tune.iteration == 0


def test_missing_data_folder(tmp_path):
    cfg = load_cfg(None, tiny_opts(tmp_path, **{"DATASET.DATA_ROOT": str(tmp_path / "nowhere")}))
    with pytest.raises(DataError, match="DATASET.DATA_ROOT.*nowhere"):
        Trainer(cfg)


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "melecole/train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def train_in_process(capfd, *args: str) -> subprocess.CompletedProcess:
    """``melecole-train ARGS`` called in this process (no interpreter start-up), as a finished process."""
    from melecole.cli.train import train_main

    code = train_main(list(args))
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(["melecole-train", *args], code, captured.out, captured.err)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_train_cli_end_to_end_and_bad_input(tmp_path, capfd):
    config = tmp_path / "tiny.yaml"
    dumped = load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "2"})).dump()
    config.write_text(dumped.replace("RUN_NAME: run", "RUN_NAME: ''"))  # '' = name runs after the file
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr
    run = next((tmp_path / "runs").glob("tiny-*"))
    assert (run / "checkpoints" / "iter_2.pt").is_file()

    # Bad input: in this process (the script path itself ran above), each one line and exit code 2.
    bad = tmp_path / "unknown.yaml"
    bad.write_text("MODEL:\n  FILTRES: [4, 8]\n")
    assert_one_line_error(train_in_process(capfd, "--config", str(bad)), "unknown.yaml", "MODEL.FILTRES")
    # yaml syntax error
    bad.write_text("MODEL:\n  FILTERS: [4, 8\n")
    assert_one_line_error(train_in_process(capfd, "--config", str(bad)), "unknown.yaml", "YAML syntax error")
    # unknown command-line key
    assert_one_line_error(train_in_process(capfd, "--config", str(config), "OPTIM.LR", "1"), "OPTIM.LR")
    # missing data folder
    gone = ("DATASET.DATA_ROOT", str(tmp_path / "gone"))
    assert_one_line_error(train_in_process(capfd, "--config", str(config), *gone), "DATASET.DATA_ROOT", "gone")
    # checkpoint of a differently shaped model
    other_shape = ("--supervised_checkpoint", str(run / "checkpoints" / "last.pt"), "MODEL.EMBEDDING_DIMENSION", "8")
    assert_one_line_error(
        train_in_process(capfd, "--config", str(config), *other_shape), "MODEL.EMBEDDING_DIMENSION", "last.pt"
    )
    # resume continues the same run to a larger TOTAL_ITER
    result = run_train("--resume", str(run), "OPTIM.TOTAL_ITER", "3")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 3


def test_bad_volumes_are_named(tmp_path):
    opts = tiny_opts(tmp_path)
    write_volume(tmp_path / "data" / "train" / "train.hdf", raw_shape=(12, 41, 40))
    shapes = r"\(12, 41, 40\).*\(12, 40, 40\)|\(12, 40, 40\).*\(12, 41, 40\)"
    with pytest.raises(DataError, match=rf"train.hdf.*({shapes})"):
        Trainer(load_cfg(None, opts)).train()
    write_volume(tmp_path / "data" / "train" / "train.hdf")
    with pytest.raises(DataError, match=r"train.hdf.*'raw'"):
        Trainer(load_cfg(None, opts + ["DATASET.RAW_KEY", "raw"])).train()


# ------------------------------------------------------------------------------------------------
# Logs, resume safety, termination, leftovers (issues 9 and 12)
# ------------------------------------------------------------------------------------------------
def write_config(tmp_path: Path, **extra: str) -> Path:
    """A tiny run's full config as a yaml file (data under tmp_path/data, runs under tmp_path/runs)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(load_cfg(None, tiny_opts(tmp_path, **extra)).dump())
    return config


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (relative path -> digest)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *fragments: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_redirected_stderr_gets_no_carriage_return_progress(tmp_path, capfd):
    """stderr captured into a file (not a terminal): LOG.PROGRESS_BAR auto writes no bar updates."""
    from melecole.cli.train import train_main

    config = write_config(tmp_path, **{"OPTIM.TOTAL_ITER": "2", "LOG.VAL_FREQUENCY": "0"})
    for setting, expect_bar in (("auto", False), ("true", True)):
        assert train_main(["--config", str(config), "LOG.PROGRESS_BAR", setting]) == 0
        captured = capfd.readouterr()
        assert ("\r" in captured.err) == expect_bar, (setting, captured.err[:500])
        assert "iter 2/2" in captured.out  # the periodic log lines are there either way


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from melecole.cli.train import train_main

    trainer = Trainer(load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "1", "LOG.VAL_FREQUENCY": "0"})))
    trainer.train()
    user = tmp_path / "P"
    (user / "models").mkdir(parents=True)
    (user / "config.yaml").write_text("mine\n")
    (user / "models" / "model.pt").write_bytes((trainer.run_dir / "checkpoints" / "last.pt").read_bytes())
    before = folder_hashes(user)
    assert train_main(["--resume", str(user / "models" / "model.pt"), "OPTIM.TOTAL_ITER", "2"]) == 2
    one_line_error(capsys, "model.pt", "not inside a run folder")
    assert folder_hashes(user) == before and sorted(p.name for p in user.iterdir()) == ["config.yaml", "models"]
    # a checkpoints/ folder beside a config.yaml that this library did not write is no run either
    (user / "models").rename(user / "checkpoints")
    before = folder_hashes(user)
    assert train_main(["--resume", str(user / "checkpoints" / "model.pt"), "OPTIM.TOTAL_ITER", "2"]) == 2
    one_line_error(capsys, "model.pt", "not inside a run folder")
    assert folder_hashes(user) == before and sorted(p.name for p in user.iterdir()) == ["checkpoints", "config.yaml"]


def test_resume_never_overwrites_later_checkpoints_or_a_finished_run(tmp_path, capsys):
    from melecole.cli.train import train_main

    trainer = Trainer(load_cfg(None, tiny_opts(tmp_path, **{"LOG.VAL_FREQUENCY": "0"})))  # 6 iterations
    trainer.train()
    run = trainer.run_dir
    before = folder_hashes(run)
    # an older checkpoint while iter_6.pt exists
    assert train_main(["--resume", str(run / "checkpoints" / "iter_3.pt")]) == 2
    one_line_error(capsys, "iter_3.pt", "iter_6.pt")
    # nothing to do: a lower or equal OPTIM.TOTAL_ITER
    for total in ("3", "6"):
        assert train_main(["--resume", str(run), "OPTIM.TOTAL_ITER", total]) == 0
        assert "nothing to do" in capsys.readouterr().err
    # --config beside --resume is not silently ignored
    other = write_config(tmp_path / "other")
    assert train_main(["--resume", str(run), "--config", str(other)]) == 2
    one_line_error(capsys, "--config", "--resume")
    assert folder_hashes(run) == before


def test_checkpoint_with_a_non_integer_iteration_is_refused(tmp_path, capsys):
    from melecole.cli.train import train_main

    trainer = Trainer(load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "1", "LOG.VAL_FREQUENCY": "0"})))
    trainer.train()
    path = trainer.run_dir / "checkpoints" / "last.pt"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["iteration"] = "1"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"last.pt': iteration is '1' \(str\), expected an integer >= 0"):
        load_checkpoint(path)
    assert train_main(["--resume", str(path), "OPTIM.TOTAL_ITER", "2"]) == 2
    one_line_error(capsys, "last.pt", "iteration is '1'")


def test_restart_removes_stale_temporary_files_of_the_library_only(tmp_path):
    opts = tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "2", "LOG.VAL_FREQUENCY": "0", "LOG.CHECKPOINT_FREQUENCY": "1"})
    trainer = Trainer(load_cfg(None, opts))
    trainer.train()
    run = trainer.run_dir
    stale = [run / "checkpoints" / ".last.pt.k2j_x9.tmp", run / "checkpoints" / ".iter_3.pt.abc123.tmp",
             run / ".config.yaml.zz9.tmp"]
    foreign = [run / ".notes.tmp", run / "checkpoints" / ".mine.pt.tmp"]
    for path in stale + foreign:
        path.write_bytes(b"partial")
    cfg, checkpoint = resume_config(run, ["OPTIM.TOTAL_ITER", "3"])
    Trainer(cfg, resume_checkpoint=checkpoint).train()
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"partial" for path in foreign)
    assert "removed 3 stale temporary file(s)" in (run / "log.txt").read_text()


def test_data_errors_leave_no_run_folder_and_later_errors_reach_log_txt(tmp_path):
    opts = tiny_opts(tmp_path, **{"LOG.VAL_FREQUENCY": "0"})
    write_volume(tmp_path / "data" / "train" / "train.hdf", raw_shape=(12, 41, 40))
    with pytest.raises(DataError, match="train.hdf"):
        Trainer(load_cfg(None, opts))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    write_volume(tmp_path / "data" / "train" / "train.hdf")

    class FailingTrainer(Trainer):
        def run_step(self, batch):
            if self.iteration == 2:
                raise DataError("train.hdf: broken patch at iteration 2")
            return super().run_step(batch)

    trainer = FailingTrainer(load_cfg(None, opts))
    with pytest.raises(DataError):
        trainer.train()
    log = (trainer.run_dir / "log.txt").read_text()
    assert "ERROR training stopped at iteration 2: train.hdf: broken patch at iteration 2" in log
    assert "run " in log.splitlines()[0]  # what was logged before the folder existed is in log.txt too


@pytest.mark.slow
@pytest.mark.parametrize("to", ["process", "group"])
def test_sigterm_saves_last_pt_that_resumes_exactly(tmp_path, to):
    """SIGTERM to the training process, or to its whole process group with the loader workers (what
    Slurm's scancel and `kill -- -PGID` do): last.pt at the iteration reached, no traceback."""
    import os
    import signal
    import time

    extra = {"OPTIM.TOTAL_ITER": "200", "OPTIM.SCHEDULER": "constant", "LOG.VAL_FREQUENCY": "0",
             "LOG.IMAGE_FREQUENCY": "0", "LOG.CHECKPOINT_FREQUENCY": "1000", "HARDWARE.NUM_WORKERS": "2"}
    config = write_config(tmp_path, **extra)
    process = subprocess.Popen([sys.executable, "melecole/train.py", "--config", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        logs = list((tmp_path / "runs").glob("*/log.txt"))
        if logs and "iter 3/200" in logs[0].read_text():
            break
        time.sleep(0.2)
    if to == "group":
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the loader workers are gone too: no process left in the group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("a loader worker outlived the stopped training process")
    (run,) = (tmp_path / "runs").iterdir()
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    stopped = checkpoint["iteration"]
    assert 3 <= stopped < 200 and not list(run.rglob("*.tmp"))
    assert "interrupted at iteration" in (run / "log.txt").read_text()

    cfg, checkpoint = resume_config(run)
    resumed = Trainer(cfg, resume_checkpoint=checkpoint)
    resumed.train(stop_at=stopped + 2)
    straight = Trainer(load_cfg(config), run_dir=tmp_path / "straight")
    straight.train(stop_at=stopped + 2)
    for (name, expected), actual in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-7, msg=name)
    assert os.environ.get("OMP_NUM_THREADS") == "1"  # both processes computed with one thread


def test_a_repeated_stop_signal_stops_at_once_only_after_a_pause():
    """The same SIGTERM arriving twice within milliseconds (directly and forwarded by the launcher,
    when a whole process group is signalled) asks for one clean stop; a second one later, at once."""
    from melecole.engine.launch import StepInterrupt

    now = [100.0]
    interrupt = StepInterrupt(clock=lambda: now[0])
    assert not interrupt.requested()
    interrupt.handler(15, None)
    now[0] += 0.01
    interrupt.handler(15, None)  # the forwarded copy: no exception, the step under way finishes
    assert interrupt.requested()
    now[0] += StepInterrupt.REPEAT_AFTER_S
    with pytest.raises(KeyboardInterrupt, match="twice"):
        interrupt.handler(2, None)


def test_progress_helpers_choose_bar_or_log_lines(caplog):
    import logging

    from melecole.utils.progress import LogProgress, progress_bar, progress_enabled

    assert progress_enabled("true") and progress_enabled(True)
    assert not progress_enabled("false") and not progress_enabled(False)
    assert progress_enabled("auto") == sys.stderr.isatty() == progress_enabled(None)
    with pytest.raises(ValueError, match="auto, true, false"):
        progress_enabled("sometimes")
    logger = logging.getLogger("test-progress")
    with caplog.at_level(logging.INFO, logger="test-progress"):
        items = list(progress_bar(range(5), desc="windows", enabled="false", log_interval_s=0.0, logger=logger))
    assert items == [0, 1, 2, 3, 4]
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("windows: 1/5 (") and lines[-1].startswith("windows: 5/5 (")
    quiet = progress_bar(total=3, enabled=False, log_interval_s=None)
    assert isinstance(quiet, LogProgress)
    quiet.update(3)
    quiet.close()


def test_unwritable_output_path_is_one_line(tmp_path, capsys):
    from melecole.cli.train import train_main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path, **{"OPTIM.TOTAL_ITER": "1", "LOG.OUTPUT_PATH": str(blocker / "runs")})
    assert train_main(["--config", str(config)]) == 2
    one_line_error(capsys, "LOG.OUTPUT_PATH", "file/runs", "expected a writable folder")
    assert blocker.read_text() == "not a folder"


def test_console_scripts_point_at_the_entry_functions(tmp_path):
    from importlib.metadata import entry_points

    from melecole.cli.train import train_distributed_main, train_main

    scripts = {entry.name: entry for entry in entry_points(group="console_scripts")}
    assert scripts["melecole-train"].load() is train_main
    assert scripts["melecole-train-distributed"].load() is train_distributed_main
    others = ("melecole-infer", "melecole-evaluate", "melecole-view", "melecole-blockwise", "melecole-tune")
    assert {name: scripts[name].value for name in others} == {
        "melecole-infer": "melecole.cli.infer:main",
        "melecole-evaluate": "melecole.cli.evaluate:main",
        "melecole-view": "melecole.cli.view:main",
        "melecole-blockwise": "melecole.cli.blockwise:main",
        "melecole-tune": "melecole.cli.tune:main",
    }
    script = Path(sys.executable).parent / "melecole-train"
    result = subprocess.run([str(script), "--config", str(tmp_path / "missing.yaml")], capture_output=True,
                            text=True, timeout=120)
    assert_one_line_error(result, "missing.yaml", "not found")


def test_sigterm_inside_a_step_stops_after_that_step_and_resumes_exactly(tmp_path):
    import os
    import signal

    cfg = load_cfg(None, tiny_opts(tmp_path, **{"LOG.CHECKPOINT_FREQUENCY": "1000", "LOG.VAL_FREQUENCY": "0"}))
    trainer = Trainer(cfg)
    optimizer_step = trainer.optimizer.step

    def step_with_a_signal(*args, **kwargs):  # SIGTERM arrives in the middle of step 3's update
        if trainer.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = step_with_a_signal
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    run = trainer.run_dir
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 3  # the whole step, then stop
    resumed_cfg, checkpoint = resume_config(run)
    resumed = Trainer(resumed_cfg, resume_checkpoint=checkpoint)
    resumed.train()
    straight = Trainer(load_cfg(None, tiny_opts(tmp_path / "straight", **{"LOG.CHECKPOINT_FREQUENCY": "1000"})))
    straight.train()
    assert resumed.iteration == straight.iteration == cfg.OPTIM.TOTAL_ITER
    for (name, expected), actual in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


def test_channels_last_trains_the_same_steps_in_channels_last_memory(tmp_path):
    opts = tiny_opts(tmp_path, **{"HARDWARE.NUM_WORKERS": "0", "OPTIM.TOTAL_ITER": "4"})
    plain = Trainer(load_cfg(None, opts), run_dir=tmp_path / "plain")
    last = Trainer(load_cfg(None, [*opts, "HARDWARE.CHANNELS_LAST", "True"]), run_dir=tmp_path / "last")
    plain_history, last_history = plain.train(keep_history=True), last.train(keep_history=True)
    convolutions = [module.weight for module in last.model.modules() if isinstance(module, torch.nn.Conv3d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convolutions)
    assert any(not w.is_contiguous() for w in convolutions)  # the layout really changed (3x3x3 kernels)
    assert [h["loss"] for h in last_history] == pytest.approx([h["loss"] for h in plain_history], rel=1e-4)
    for (name, expected), actual in zip(plain.model.state_dict().items(), last.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, msg=name)
    # Its checkpoint is an ordinary one: the weights load into a model built without the option.
    checkpoint = load_checkpoint(last.run_dir / "checkpoints" / "last.pt")
    reloaded = Trainer(load_cfg(None, opts), run_dir=tmp_path / "reloaded").model
    reloaded.load_state_dict(checkpoint["model"])
    torch.testing.assert_close(reloaded.state_dict(), last.model.state_dict(), rtol=0, atol=0)


def test_fine_tuning_crosses_the_descriptor_head_both_ways(tmp_path):
    lsd = {"MODEL.LSD_HEAD": "True", "LOSS.LSD_WEIGHT": "1.0", "OPTIM.TOTAL_ITER": "1", "HARDWARE.NUM_WORKERS": "0"}
    with_head = Trainer(load_cfg(None, tiny_opts(tmp_path, **lsd)), run_dir=tmp_path / "lsd")
    with_head.train()
    plain = Trainer(load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "1"})),
                    supervised_checkpoint=with_head.run_dir / "checkpoints" / "last.pt", run_dir=tmp_path / "plain")
    assert plain.model.lsd_head is None  # the head's weights are dropped, every other weight is copied
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(value, with_head.model.state_dict()[name], rtol=0, atol=0, msg=name)
    plain.train()
    # The other way: the checkpoint has no head, the new model keeps its head's fresh initialisation.
    again = Trainer(load_cfg(None, tiny_opts(tmp_path, **lsd)),
                    supervised_checkpoint=plain.run_dir / "checkpoints" / "last.pt", run_dir=tmp_path / "again")
    head = {name for name in again.model.state_dict() if name.startswith("lsd_head.")}
    assert head
    for name, value in again.model.state_dict().items():
        if name not in head:
            torch.testing.assert_close(value, plain.model.state_dict()[name], rtol=0, atol=0, msg=name)
    assert "fresh descriptor head" in (again.run_dir / "log.txt").read_text()
