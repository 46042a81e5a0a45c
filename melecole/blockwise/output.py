"""The output of a blockwise run: where it goes, whether it may be written, and its commit.

Every check here runs before any cluster starts (docs/blockwise.md, "What is checked"):

- the output is a zarr URL apart from every input (:func:`melecole.io.ownership.check_disjoint`) in a
  writable folder;
- one run per output: :class:`melecole.io.ownership.OutputLock` on the work folder's ``lock``;
- an existing output is replaced (``--overwrite``) only when MeLeCoLe wrote it, and an existing work
  folder is cleared only when it holds nothing but the work folder's own entries;
- ``--resume`` of a finished output compares the fingerprint the output records (inputs, shape,
  options, and for ``infer.py --blockwise`` the prediction's) with this command's, and says that the
  chunks themselves were not re-read.

Work folders: ``.<root name>[-<key>].blockwise`` beside the zarr root (the segmentation's tasks) and
``.<...>.predicted`` (``infer.py --blockwise``'s affinities).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from melecole.errors import ConfigError, DataError
from melecole.io.atomic import atomic_write_text, replace_folder
from melecole.io.checks import check_disjoint, check_writable_folder
from melecole.io.formats.zarr import create_groups
from melecole.io.ownership import check_replaceable, own_attributes, read_own_attributes
from melecole.io.volumes import VolumeURL, parse_volume_url

__all__ = [
    "OutputTarget",
    "output_target",
    "absolute_url",
    "check_flags",
    "check_target",
    "output_state",
    "clear_work_folder",
    "commit_output",
    "complete_line",
    "OUTPUT_KIND",
]

OUTPUT_KIND = "blockwise-segmentation"
# What a work folder may hold (tasks.py and predict.py write these); anything else stops a clean-up.
WORK_ENTRIES = {
    "manifest.json", "fragments.zarr", "graph", "lookup.npz", "segmentation.zarr", "done", "lock",
    "affinities.zarr", "foreground.zarr",
}
State = Literal["fresh", "resume", "complete"]


@dataclass(frozen=True)
class OutputTarget:
    """A parsed zarr output: the URL as given, the final array folder, the work folders beside the root."""

    url: str
    parsed: VolumeURL

    @property
    def root(self) -> Path:
        return Path(self.parsed.path)

    @property
    def final(self) -> Path:
        return self.root / self.parsed.key if self.parsed.key else self.root

    @property
    def workdir(self) -> Path:
        suffix = f"-{self.parsed.key.replace('/', '-')}" if self.parsed.key else ""
        return self.root.parent / f".{self.root.name}{suffix}.blockwise"

    @property
    def prediction_folder(self) -> Path:
        return self.workdir.parent / (self.workdir.name[: -len(".blockwise")] + ".predicted")

    @property
    def what(self) -> str:
        return f"--output '{self.url}'"


def output_target(output_url: str) -> OutputTarget:
    """Parses ``--output``; ConfigError unless it is a zarr URL."""
    try:
        parsed = parse_volume_url(output_url)
    except DataError:
        parsed = None
    if parsed is None or parsed.format != "zarr":
        raise ConfigError(f"--output '{output_url}': not a zarr URL, expected a zarr folder (x.zarr or x.zarr:key)")
    return OutputTarget(str(output_url), parsed)


def absolute_url(url: str | None) -> str | None:
    """A local volume URL with its file or folder made absolute (a resumed run may start elsewhere)."""
    if url is None:
        return None
    parsed = parse_volume_url(url)
    if parsed.format == "precomputed":
        return parsed.path if parsed.path.startswith("file://") else url
    path = str(Path(parsed.path).expanduser().absolute())
    return f"{path}:{parsed.key}" if parsed.key else path


def check_flags(resume: bool, overwrite: bool, scheduler_timeout: float | None = None) -> None:
    """One-line ConfigErrors for flag values the parser cannot refuse."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: give one of them")
    if scheduler_timeout is not None and not (scheduler_timeout > 0 and scheduler_timeout < float("inf")):
        raise ConfigError(f"--scheduler-timeout: {scheduler_timeout:g}, expected a positive number of seconds")


def check_target(target: OutputTarget, inputs: Mapping[str, str | None]) -> None:
    """Before any work: the output apart from every input, its folders writable, a zarr root (if it
    exists and a key is given) that is a zarr group."""
    check_disjoint(target.url, inputs, target.what)
    check_writable_folder(target.root.parent, target.what)
    if target.parsed.key and target.root.exists():
        if not target.root.is_dir() or not any((target.root / n).is_file() for n in (".zgroup", "zarr.json")):
            raise DataError(
                f"{target.what}: '{target.root}' is not a zarr group, expected a zarr group to add "
                f"'{target.parsed.key}' to, or a new path"
            )
        check_writable_folder(target.root, target.what)


def _manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / "manifest.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return {}


def clear_work_folder(folder: Path, what: str) -> None:
    """Removes a work folder's entries (keeping its ``lock``); refuses a folder holding anything else."""
    if not folder.exists():
        return
    entries = [name for name in os.listdir(folder) if name != "lock"]
    foreign = [name for name in entries if name not in WORK_ENTRIES and not name.startswith(".")]
    if foreign or not folder.is_dir() or folder.is_symlink():
        raise DataError(
            f"{what}: work folder '{folder}' holds entries MeLeCoLe did not write ({', '.join(foreign[:5])}), "
            "expected only a run's work files (nothing was touched)"
        )
    for name in entries:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _finished_state(target: OutputTarget, fingerprint: Any, resume: bool, overwrite: bool) -> State:
    """The final output exists: replace it (``overwrite``), call it complete (``resume``), or refuse."""
    if overwrite:
        check_replaceable(target.final, target.what)
        clear_work_folder(target.workdir, target.what)
        return "fresh"
    if not resume:
        raise DataError(f"{target.what}: already exists, expected --resume or --overwrite to replace it")
    mark = read_own_attributes(target.final)
    if mark is None or not mark.get("complete"):
        raise DataError(
            f"{target.what}: '{target.final}' is not a finished MeLeCoLe output, expected --resume on the output "
            "of an interrupted run of this command"
        )
    if mark.get("fingerprint") != fingerprint:
        differs = sorted(
            key for key in set(fingerprint) | set(mark.get("fingerprint") or {})
            if (mark.get("fingerprint") or {}).get(key) != fingerprint.get(key)
        )
        raise DataError(
            f"{target.what}: finished by a run with other {', '.join(differs) or 'settings'}, expected the same "
            "inputs, options and config to resume (or --overwrite to recompute)"
        )
    return "complete"


def output_state(
    target: OutputTarget, manifest: dict[str, Any], fingerprint: dict[str, Any], *, resume: bool, overwrite: bool
) -> State:
    """What to do with the output, holding its lock: ``fresh`` (work folder cleared), ``resume`` (the work
    folder's manifest equals ``manifest``), or ``complete`` (the finished output records ``fingerprint``).

    Raises:
        DataError: an existing output or interrupted run without the right flag, an output MeLeCoLe did
            not write, or a resume of a run with other inputs or options.
    """
    if os.path.lexists(target.final):
        state = _finished_state(target, fingerprint, resume, overwrite)
        if state == "complete":
            # A run killed between its commit and the work folder's removal leaves that folder behind.
            clear_work_folder(target.workdir, target.what)
        return state
    found = _manifest(target.workdir)
    if found is None:
        clear_work_folder(target.workdir, target.what)  # only a stale lock or temporaries
        return "fresh"
    if overwrite:
        clear_work_folder(target.workdir, target.what)
        return "fresh"
    if not resume:
        raise DataError(
            f"{target.workdir}: an interrupted run of this output, expected --resume to finish it or --overwrite"
        )
    if found != manifest:
        raise DataError(
            f"{target.workdir}: the interrupted run used other inputs or options, expected the same command "
            "(or --overwrite to start again)"
        )
    return "resume"


def complete_line(target: OutputTarget) -> str:
    """What ``--resume`` says of a finished output (whose data it does not re-read)."""
    return (
        f"{target.final}: already complete, nothing to resume (its fingerprint matches this command; the chunks "
        "were not re-read: --overwrite recomputes them)"
    )


def _mark_finished(array_folder: Path, fingerprint: dict[str, Any]) -> None:
    """Adds MeLeCoLe's mark (with the run's fingerprint, complete) to the attributes of the work output
    (zarr v2: ``.zattrs``, written atomically): those of the NGFF label image group that
    :func:`melecole.io.ensure_work_array` made it (its OME-Zarr metadata is kept), or, for a work folder
    left by an earlier version, of the plain array."""
    path = array_folder / ".zattrs"
    attributes = json.loads(path.read_text()) if path.is_file() else {}
    attributes.update(own_attributes(OUTPUT_KIND, fingerprint=fingerprint, complete=True))
    atomic_write_text(path, json.dumps(attributes, indent=2))


def commit_output(array_folder: Path, target: OutputTarget, fingerprint: dict[str, Any]) -> None:
    """Marks the finished array as MeLeCoLe's and moves it to ``target.final`` (replacing an earlier
    output of MeLeCoLe only: the ownership check is repeated here, just before the rename)."""
    _mark_finished(array_folder, fingerprint)
    if target.parsed.key:
        create_groups(target.root, target.parsed.key)
    check_replaceable(target.final, target.what)
    replace_folder(array_folder, target.final)
