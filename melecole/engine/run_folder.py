"""Run folders of training: made with a marker, recognised by it, never written when they are not ours.

A run folder is ``LOG.OUTPUT_PATH/<RUN_NAME>-<timestamp>/`` with ``config.yaml``, ``log.txt``,
``tensorboard/`` and ``checkpoints/{last,iter_N}.pt``. The first file the library writes into a
folder it makes is the marker ``.melecole-run.json`` (atomically): library, version, creation time,
host and process id. The library writes into an existing folder again (``--resume``, or a ``run_dir``
given to the Trainer) only when it is recognised as a run folder of MeLeCoLe:

- **Marked**: it holds the marker. Its ``config.yaml``, if present, must still be a config dump of the
  library (equal to the config stored in the resumed checkpoint, or to its own re-dump): one edited by
  hand (comments, a changed value) is refused instead of silently overwritten. A resumed run takes its
  config from the checkpoint plus KEY VALUE overrides, never from an edited ``config.yaml``.
- **Written by an earlier version** (no marker yet): it holds ``checkpoints/``, ``log.txt`` and a
  ``config.yaml`` that is such a config dump byte for byte, so rewriting it cannot lose anything a
  person wrote. It gets the marker (``"adopted": true``) when the library writes into it again.

Any other folder (e.g. a user's own ``config.yaml`` beside ``checkpoints/last.pt``) is refused with a
one-line error and nothing in it is changed. Refusing, rather than quietly resuming into a new run
folder, is what a careful user expects: ``--resume`` asks to continue *that* run, and a new folder
elsewhere would hide that the request could not be honoured. The message says how to go on: a new
run from the checkpoint's weights with ``--config CONFIG --supervised_checkpoint CKPT``.

A run that was killed before it saved its first checkpoint (e.g. kill -9 inside the first write of
``last.pt``) has nothing to resume: :func:`check_resumable_folder` removes the temporary files that
the killed writes left and says that no checkpoint was ever saved (the folder may be deleted).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import time
from pathlib import Path

import melecole
from melecole.config import cfg_from_yaml_text
from melecole.errors import CheckpointError, ConfigError, MeLeCoLeError
from melecole.utils.files import atomic_write_text

__all__ = [
    "RUN_MARKER",
    "adopt_or_refuse_run_dir",
    "check_no_later_checkpoints",
    "check_resumable_folder",
    "is_run_dir",
    "make_run_dir",
    "read_run_marker",
    "remove_stale_temporary_files",
    "resume_run_dir",
    "write_run_marker",
]

RUN_MARKER = ".melecole-run.json"
MARKER_LIBRARY = "melecole"
# What the library writes (or appends to) in a run folder: their presence in a folder without the
# marker means the folder holds files that are not known to be ours.
LIBRARY_NAMES = ("config.yaml", "log.txt", "checkpoints", "tensorboard")
# A temporary file younger than this may belong to a write in progress (another process) and is kept
# by the cleaning before a refused --resume.
STALE_AFTER_S = 2.0
# Temporary files that this library's atomic writes leave when killed: ".<name>.<random>.tmp".
_TEMPORARY_FILE = re.compile(r"^\.(config\.yaml|last\.pt|iter_\d+\.pt|\.melecole-run\.json)\.[A-Za-z0-9_]+\.tmp$")
_CHECKPOINT_NAME = re.compile(r"^iter_(\d+)\.pt$")


# ----------------------------------------------------------------------------------------------
# The marker
# ----------------------------------------------------------------------------------------------
def write_run_marker(run_dir: str | Path, adopted: bool = False) -> Path:
    """Writes ``run_dir/.melecole-run.json`` atomically; returns its path.

    Args:
        run_dir: an existing folder.
        adopted: True for a run folder of an earlier version that gets its marker late.
    """
    record = {
        "library": MARKER_LIBRARY,
        "version": melecole.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if adopted:
        record["adopted"] = True
    path = Path(run_dir) / RUN_MARKER
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def read_run_marker(run_dir: str | Path) -> dict | None:
    """The marker's record, or None when the folder has no (readable MeLeCoLe) marker."""
    try:
        record = json.loads((Path(run_dir) / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return record if isinstance(record, dict) and record.get("library") == MARKER_LIBRARY else None


def make_run_dir(cfg) -> Path:
    """Makes OUTPUT_PATH/<RUN_NAME>-<YYYYmmdd-HHMMSS>/ (a suffix is added if that folder exists) with
    its marker and an empty checkpoints/."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.LOG.OUTPUT_PATH) / f"{cfg.LOG.RUN_NAME}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    run_dir, suffix = base, 1
    while True:
        try:
            run_dir.mkdir()  # not exist_ok: two runs started in one second get different folders
            break
        except FileExistsError:
            run_dir = base.with_name(f"{base.name}-{suffix}")
            suffix += 1
    write_run_marker(run_dir)
    (run_dir / "checkpoints").mkdir()
    return run_dir


# ----------------------------------------------------------------------------------------------
# Recognising a run folder
# ----------------------------------------------------------------------------------------------
def _is_library_dump(config: Path, stored_config: str | None) -> bool:
    """True when ``config``'s text is exactly a config dump of the library: the config stored in the
    checkpoint (``stored_config``), or what loading and dumping the file gives back."""
    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    if stored_config is not None and text == stored_config:
        return True
    try:
        return cfg_from_yaml_text(text, source=str(config)).dump() == text
    except MeLeCoLeError:
        return False


def _missing_evidence(run_dir: Path, stored_config: str | None) -> list[str]:
    """What a run folder of an earlier version (no marker) lacks of what the library writes; [] = ours."""
    missing = [f"no {name}" for name in ("checkpoints/", "log.txt", "config.yaml")
               if not (run_dir / name.rstrip("/")).exists()]
    if (run_dir / "config.yaml").exists() and not _is_library_dump(run_dir / "config.yaml", stored_config):
        missing.append("its config.yaml is not a config dump of the library (edited or written by hand)")
    return missing


def is_run_dir(run_dir: str | Path, stored_config: str | None = None) -> bool:
    """True for a run folder of MeLeCoLe: it has the marker, or it was written by an earlier version
    (``checkpoints/``, ``log.txt`` and a ``config.yaml`` that is a config dump of the library)."""
    run_dir = Path(run_dir)
    return read_run_marker(run_dir) is not None or not _missing_evidence(run_dir, stored_config)


def _check_config_unedited(run_dir: Path, stored_config: str | None, what: str) -> None:
    """ConfigError when a marked run folder's config.yaml was edited (it would be overwritten)."""
    config = run_dir / "config.yaml"
    if config.exists() and not _is_library_dump(config, stored_config):
        raise ConfigError(
            f"{what}: '{config}' was edited since the library wrote it (it is no config dump of the library), "
            "expected the library's own file, which a resumed run rewrites: give changes as KEY VALUE "
            "overrides and move the edited file away; nothing was changed"
        )


def adopt_or_refuse_run_dir(run_dir: str | Path, stored_config: str | None = None) -> str:
    """Makes sure the library may write into ``run_dir``, before anything is written there.

    Args:
        run_dir: a run folder (may not exist yet).
        stored_config: the config text of the checkpoint that is resumed into it, if any.

    Returns:
        "marked" (it has the marker), "adopted" (a run folder of an earlier version: the marker was
        added now) or "new" (a missing or new folder: made, with the marker).

    Raises:
        ConfigError: the folder holds config.yaml, log.txt, checkpoints/ or tensorboard/ but is no run
            folder of MeLeCoLe, or a marked folder's config.yaml was edited; nothing was changed.
    """
    run_dir = Path(run_dir)
    what = f"run folder '{run_dir}'"
    if read_run_marker(run_dir) is not None:
        _check_config_unedited(run_dir, stored_config, what)
        return "marked"
    if not _missing_evidence(run_dir, stored_config):
        write_run_marker(run_dir, adopted=True)
        return "adopted"
    present = [name for name in LIBRARY_NAMES if (run_dir / name).exists()]
    if present:
        raise ConfigError(
            f"{what}: not written by MeLeCoLe (no {RUN_MARKER}; " + "; ".join(_missing_evidence(run_dir, stored_config))
            + f") but it holds {', '.join(present)}, expected a new or empty folder or a run folder of MeLeCoLe; "
            "nothing was changed"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_marker(run_dir)
    return "new"


# ----------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------
def resume_run_dir(checkpoint: dict) -> Path:
    """The run folder that a resumed checkpoint continues: RUN for RUN/checkpoints/<name>.pt.

    Raises:
        CheckpointError: the checkpoint does not lie in a run folder of MeLeCoLe (so nothing is written
            into a folder the library did not make), the run folder's config.yaml was edited, or the
            run already holds later checkpoints (resuming would overwrite them).
    """
    source = checkpoint["path"]
    path = Path(source).resolve()
    run_dir = path.parent.parent
    if path.parent.name != "checkpoints":
        raise CheckpointError(
            f"--resume '{source}': not inside a run folder of this library (RUN/checkpoints/<name>.pt beside "
            "RUN/config.yaml), expected a run folder or one of its checkpoints; to start a new run from these "
            "weights use --config CONFIG --supervised_checkpoint CKPT"
        )
    stored_config = checkpoint.get("config")
    if read_run_marker(run_dir) is None and (missing := _missing_evidence(run_dir, stored_config)):
        raise CheckpointError(
            f"--resume '{source}': not inside a run folder of MeLeCoLe: '{run_dir}' has no {RUN_MARKER} (written "
            f"when the library makes a run folder) and {'; '.join(missing)}, expected a run folder made by "
            f"melecole-train; nothing was changed: to start a new run from these weights use --config CONFIG "
            f"--supervised_checkpoint {source}"
        )
    try:
        _check_config_unedited(run_dir, stored_config, f"--resume '{source}'")
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    check_no_later_checkpoints(run_dir, int(checkpoint["iteration"]), source)
    return run_dir


def check_no_later_checkpoints(run_dir: Path, iteration: int, source: str) -> None:
    """CheckpointError if ``run_dir/checkpoints`` holds an iter_<N>.pt with N > ``iteration``."""
    later = [name for number, name in _saved_checkpoints(Path(run_dir)) if number > iteration]
    if later:
        raise CheckpointError(
            f"--resume '{source}': iteration {iteration}, but run folder '{run_dir}' already has the later "
            f"checkpoint(s) {', '.join(later)}, expected the latest one (resume from the "
            "run folder), or start a new run from it with --supervised_checkpoint"
        )


def _saved_checkpoints(run_dir: Path) -> list[tuple[int, str]]:
    """(N, 'iter_N.pt') of every periodic checkpoint in ``run_dir/checkpoints``, by N."""
    folder = run_dir / "checkpoints"
    return sorted(
        (int(match.group(1)), path.name)
        for path in (folder.iterdir() if folder.is_dir() else [])
        if (match := _CHECKPOINT_NAME.match(path.name))
    )


def remove_stale_temporary_files(run_dir: Path, min_age_s: float = 0.0) -> list[Path]:
    """Removes the temporary files that killed atomic writes of this library left in a run folder.

    Args:
        run_dir: the run folder (its top level and checkpoints/ are cleaned).
        min_age_s: keep temporaries modified less than this many seconds ago (a write in progress).

    Returns:
        The removed paths (only the library's temporary names: ``.last.pt.<random>.tmp`` and alike).
    """
    removed = []
    now = time.time()
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for path in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
            if not _TEMPORARY_FILE.match(path.name) or not path.is_file() or path.is_symlink():
                continue
            try:  # another process (a torchrun rank) may remove it at the same time
                if min_age_s > 0 and now - path.stat().st_mtime < min_age_s:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def check_resumable_folder(resume: str | Path) -> None:
    """For ``--resume FOLDER``: a run folder of MeLeCoLe without ``checkpoints/last.pt`` is explained.

    Stale temporary files of the library are removed from it first (a run killed inside its first
    checkpoint write leaves a ``.last.pt.<random>.tmp``). Folders that are not run folders of MeLeCoLe,
    or that have ``last.pt``, are left to :func:`melecole.engine.checkpoint.load_checkpoint`.

    Raises:
        CheckpointError: the run never saved a checkpoint (it may be deleted), or it has iter_<N>.pt
            files but no last.pt (the message names the latest one to resume from).
    """
    folder = Path(resume)
    run_dir = folder.parent if folder.name == "checkpoints" and not (folder / "checkpoints").is_dir() else folder
    if not folder.is_dir() or (run_dir / "checkpoints" / "last.pt").exists() or (folder / "last.pt").exists():
        return
    if not (run_dir / "checkpoints").is_dir() or not is_run_dir(run_dir):
        return
    removed = remove_stale_temporary_files(run_dir, min_age_s=STALE_AFTER_S)
    saved = _saved_checkpoints(run_dir)
    if saved:
        latest = run_dir / "checkpoints" / saved[-1][1]
        raise CheckpointError(
            f"--resume '{resume}': run folder '{run_dir}' has no checkpoints/last.pt but has "
            f"{', '.join(name for _, name in saved)}, expected last.pt: resume from the latest with --resume {latest}"
        )
    pending = [path.name for path in _temporary_files(run_dir)]
    if pending:
        raise CheckpointError(
            f"--resume '{resume}': run folder '{run_dir}' has no checkpoints/last.pt yet and a write in progress "
            f"({', '.join(pending)}), expected a saved checkpoint: is another training running in this folder?"
        )
    cleaned = f"; removed {len(removed)} temporary file(s) of an interrupted write" if removed else ""
    raise CheckpointError(
        f"--resume '{resume}': run folder '{run_dir}' has no checkpoints/last.pt: the run never saved a "
        f"checkpoint (it stopped before its first one{cleaned}), expected a run with a saved checkpoint; "
        "nothing to resume: start a new run with --config (this folder may be deleted)"
    )


def _temporary_files(run_dir: Path) -> list[Path]:
    """The library's temporary files still in ``run_dir`` and its checkpoints/ folder."""
    return [path for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir()
            for path in sorted(folder.glob(".*.tmp")) if _TEMPORARY_FILE.match(path.name)]
