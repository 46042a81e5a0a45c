"""Embedded synthetic dataset: anisotropic serial-section EM of densely packed neurites.

The generator imitates what a segmentation network sees in data such as SNEMI3D (6 x 6 x 30 nm):
neurites as tubes that run mostly along z (some obliquely or in-plane), packed densely, separated
by thin dark membranes, with intracellular texture, vesicles and mitochondria that are dark but are
not boundaries. Sections are thick compared with the in-plane pixel, so objects shift between
sections. Optional section defects (missing, low-contrast, blurred, misaligned sections) imitate
acquisition problems.

Library use::

    raw, labels = generate_volume((32, 160, 160), seed=0)   # uint8 and uint32, (Z, Y, X)
    generate_dataset("dataset/synthetic", seed=0)          # train/val/test HDF5 files

Command line (:mod:`melecole.cli.synthetic`)::

    python -m melecole.data.synthetic --out dataset/synthetic --seed 0 [--small]

Labels: 0 = boundary (membrane) or unlabelled, 1..N neurites; every id is one 6-connected
component of the volume (a neurite that leaves and re-enters the crop gets two ids).

Why this module is over 600 lines: it is one generator. About 30 private steps (tube skeletons,
radii, dense labels, membranes, organelles, rendering, section defects) serve only
:func:`generate_volume`, draw in turn from its one random stream and read top to bottom as one
pipeline; split over several modules they would be no simpler, only scattered.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cc3d
import fastremap
import numpy as np
from scipy import ndimage as ndi

from melecole.errors import DataError
from melecole.io import check_writable_folder
from melecole.io.hdf5_output import create_hdf5
from melecole.utils.logger import get_logger

logger = logging.getLogger(__name__)

Shape3D = tuple[int, int, int]

DEFAULT_SHAPE: Shape3D = (32, 160, 160)
SMALL_SHAPE: Shape3D = (16, 64, 64)
DEFAULT_SPLITS: dict[str, int] = {"train": 2, "val": 1, "test": 1}
# Section defects are on for training volumes only, so val/test scores measure segmentation, not
# robustness to artefacts.
DEFAULT_DEFECT_SPLITS: tuple[str, ...] = ("train",)
RESOLUTION_NM: tuple[float, float, float] = (30.0, 6.0, 6.0)

# Margin of the internal working grid around the returned crop: tubes outside the crop still shape
# the objects near its faces, and misaligned sections are cut from this margin.
_MARGIN_Z = 1
_MARGIN_XY = 8
# Spacing of skeleton samples along a tube, in physical units (in-plane pixels).
_TUBE_STEP = 1.5


@dataclass
class _Tubes:
    """Skeleton samples of all tubes, in physical units (z scaled by the anisotropy)."""

    points: np.ndarray  # (N, 3) float64, (z, y, x)
    radii: np.ndarray  # (N,) float64, in-plane pixels
    ids: np.ndarray  # (N,) int64, neurite id (a branch shares its parent's id)
    mitochondria: list[tuple[np.ndarray, float, int]]  # (points (M, 3), radius, owner id)
    boutons: list[tuple[np.ndarray, float, int]]  # (centre (3,), radius, owner id)


def _smooth_series(rng: np.random.Generator, length: int, correlation: float) -> np.ndarray:
    """(length,) stationary Ornstein-Uhlenbeck series, unit variance, correlation length in steps."""
    rho = float(np.exp(-1.0 / max(correlation, 1e-6)))
    innovations = rng.standard_normal(length) * np.sqrt(1.0 - rho * rho)
    series = np.empty(length)
    value = rng.standard_normal()
    for index in range(length):
        value = rho * value + innovations[index]
        series[index] = value
    return series


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    step: float,
    wiggle: float,
    max_steps: int = 4000,
) -> np.ndarray:
    """(N, 3) points of a smooth random curve from ``start`` until it leaves the box [low, high]."""
    points = [start.copy()]
    position = start.copy()
    direction = direction / np.linalg.norm(direction)
    drift = np.zeros(3)
    rho = 0.9  # the direction's change is itself correlated, which keeps the curve smooth
    for _ in range(max_steps):
        drift = rho * drift + np.sqrt(1 - rho * rho) * wiggle * rng.standard_normal(3)
        direction = direction + drift
        direction /= np.linalg.norm(direction)
        position = position + step * direction
        if np.any(position < low) or np.any(position > high):
            break
        points.append(position.copy())
    return np.asarray(points)


def _direction(tilt_degrees: float, azimuth: float) -> np.ndarray:
    """Unit vector (z, y, x) at ``tilt_degrees`` from the z axis."""
    tilt = np.deg2rad(tilt_degrees)
    return np.array([np.cos(tilt), np.sin(tilt) * np.sin(azimuth), np.sin(tilt) * np.cos(azimuth)])


def _random_direction(rng: np.random.Generator, bundle: np.ndarray) -> np.ndarray:
    """Unit vector (z, y, x): mostly near the volume's ``bundle`` direction, some oblique, a few in-plane.

    Neurites in neuropil run in loose fascicles, so most tubes share a tilted main direction;
    they then cross each other rarely and shift together between sections.
    """
    category = rng.random()
    if category < 0.7:
        direction = bundle + 0.3 * rng.standard_normal(3)
        return direction * np.sign(direction[0] + 1e-9) / np.linalg.norm(direction)
    if category < 0.9:
        return _direction(rng.uniform(40.0, 68.0), rng.uniform(0.0, 2.0 * np.pi))
    return _direction(rng.uniform(68.0, 90.0), rng.uniform(0.0, 2.0 * np.pi))


@dataclass
class _TubeParts:
    """Tubes collected while tracing; :meth:`finish` turns them into :class:`_Tubes`."""

    points: list[np.ndarray] = field(default_factory=list)  # (n, 3) skeletons
    radii: list[np.ndarray] = field(default_factory=list)  # (n,) radii per skeleton
    ids: list[np.ndarray] = field(default_factory=list)  # (n,) neurite id per skeleton
    mitochondria: list[tuple[np.ndarray, float, int]] = field(default_factory=list)
    boutons: list[tuple[np.ndarray, float, int]] = field(default_factory=list)
    filled: float = 0.0  # summed tube volume inside the box so far

    def add(self, skeleton: np.ndarray, radii: np.ndarray, neurite_id: int, extent: np.ndarray) -> None:
        """Adds one (n, 3) skeleton with its (n,) radii; counts its volume inside [0, extent]."""
        inside = np.all((skeleton >= 0) & (skeleton <= extent), axis=1)
        self.filled += float(np.sum(np.pi * radii[inside] ** 2 * _TUBE_STEP))
        self.points.append(skeleton)
        self.radii.append(radii)
        self.ids.append(np.full(len(skeleton), neurite_id))

    def finish(self) -> _Tubes:
        """All skeleton samples concatenated."""
        return _Tubes(
            points=np.concatenate(self.points),
            radii=np.concatenate(self.radii),
            ids=np.concatenate(self.ids),
            mitochondria=self.mitochondria,
            boutons=self.boutons,
        )


def _neurite_style(
    rng: np.random.Generator, bundle: np.ndarray, is_dendrite: bool, radius_scale: float
) -> tuple[float, np.ndarray, float]:
    """Base radius (in-plane pixels), (3,) initial direction and wiggle of a new dendrite or axon."""
    if is_dendrite:
        base_radius = rng.uniform(14.0, 22.0) * radius_scale
        direction = _random_direction(rng, bundle) if rng.random() < 0.5 else bundle
        return base_radius, direction, 0.015
    base_radius = float(np.clip(rng.lognormal(np.log(6.5), 0.35), 3.5, 12.0)) * radius_scale
    direction = _random_direction(rng, bundle)
    return base_radius, direction, rng.uniform(0.015, 0.04)


def _branch_direction(rng: np.random.Generator, trunk: np.ndarray, index: int) -> np.ndarray:
    """(3,) unit-ish direction of a branch leaving the (N, 3) ``trunk`` at ``index``, 30-75 degrees off it."""
    trunk_direction = trunk[min(index + 1, len(trunk) - 1)] - trunk[max(index - 1, 0)]
    trunk_direction /= np.linalg.norm(trunk_direction) + 1e-9
    kick = rng.standard_normal(3)
    kick -= kick.dot(trunk_direction) * trunk_direction
    kick /= np.linalg.norm(kick) + 1e-9
    angle = np.deg2rad(rng.uniform(30.0, 75.0))
    return np.cos(angle) * trunk_direction + np.sin(angle) * kick


def _neurite_skeletons(
    rng: np.random.Generator,
    extent: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray],
    direction: np.ndarray,
    wiggle: float,
    max_branches: int,
    branch_probability: float,
) -> list[np.ndarray]:
    """(N, 3) skeletons of one neurite: the trunk through a random start, then its branches."""
    low, high = bounds
    start = rng.uniform(0.0, 1.0, 3) * extent
    forward = _walk(rng, start, direction, low, high, _TUBE_STEP, wiggle)
    backward = _walk(rng, start, -direction, low, high, _TUBE_STEP, wiggle)
    skeletons = [np.concatenate([backward[::-1], forward[1:]], axis=0)]
    for _ in range(rng.binomial(max_branches, branch_probability)):
        trunk = skeletons[0]
        if len(trunk) < 8:
            break
        index = int(rng.integers(len(trunk) // 4, 3 * len(trunk) // 4 + 1))
        branch_direction = _branch_direction(rng, trunk, index)
        skeletons.append(_walk(rng, trunk[index], branch_direction, low, high, _TUBE_STEP, wiggle))
    return skeletons


def _tube_radii(
    rng: np.random.Generator,
    skeleton: np.ndarray,
    radius0: float,
    is_dendrite: bool,
    neurite_id: int,
    boutons: list[tuple[np.ndarray, float, int]],
) -> np.ndarray:
    """(N,) radii along the (N, 3) ``skeleton``, at least 3; axons may get boutons (appended to ``boutons``)."""
    n = len(skeleton)
    radii = radius0 * np.exp(0.18 * _smooth_series(rng, n, 25.0 / _TUBE_STEP))
    if not is_dendrite and rng.random() < 0.4:
        # Varicosities (boutons): swellings that hold vesicle clusters.
        arc = np.arange(n) * _TUBE_STEP
        for centre in np.arange(rng.uniform(0.0, 80.0), arc[-1], rng.uniform(60.0, 140.0)):
            width = rng.uniform(2.0, 3.0) * radius0
            bump = 1.0 + rng.uniform(0.5, 1.0) * np.exp(-(((arc - centre) / width) ** 2))
            radii *= bump
            index = int(centre / _TUBE_STEP)
            boutons.append((skeleton[index], float(0.9 * radii[index]), neurite_id))
    return np.maximum(radii, 3.0)


def _tube_mitochondria(
    rng: np.random.Generator, skeleton: np.ndarray, radii: np.ndarray, is_dendrite: bool, neurite_id: int
) -> list[tuple[np.ndarray, float, int]]:
    """Mitochondria (points (M, 3), radius, owner): dark capsules along the axis of wide enough tubes."""
    n = len(skeleton)
    found = []
    n_mitochondria = rng.poisson(3.5 if is_dendrite else 0.8) if radii.mean() > 5.0 else 0
    for _ in range(n_mitochondria):
        length = int(rng.uniform(12.0, 45.0) / _TUBE_STEP)
        first = int(rng.integers(0, max(1, n - length)))
        segment = slice(first, first + length)
        radius = float(rng.uniform(0.4, 0.65) * np.min(radii[segment]))
        if radius >= 2.0:
            offset = rng.standard_normal(3) * 0.25 * radius
            found.append((skeleton[segment] + offset, radius, neurite_id))
    return found


def _trace_tubes(
    rng: np.random.Generator,
    extent: np.ndarray,
    fill_fraction: float,
    radius_scale: float,
    branch_probability: float,
) -> _Tubes:
    """Random neurite skeletons in the physical box [0, extent] (z, y, x).

    Tubes are added until their summed volume reaches ``fill_fraction`` of the box (tubes may
    overlap; the dense partition later resolves that). A few thick dendrites with mitochondria,
    many thin axons, some with boutons (swellings holding vesicle clusters); some tubes branch.
    """
    bounds = (-np.array([6.0, 12.0, 12.0]), extent + np.array([6.0, 12.0, 12.0]))
    box_volume = float(np.prod(extent))
    bundle = _direction(rng.uniform(8.0, 30.0), rng.uniform(0.0, 2.0 * np.pi))
    parts = _TubeParts()
    neurite_id = 0
    n_dendrites = max(1, int(round(rng.uniform(0.6, 1.4) * box_volume / 1.5e6)))
    while parts.filled < fill_fraction * box_volume and neurite_id < 5000:
        neurite_id += 1
        is_dendrite = neurite_id <= n_dendrites
        base_radius, direction, wiggle = _neurite_style(rng, bundle, is_dendrite, radius_scale)
        max_branches = 3 if is_dendrite else 1
        skeletons = _neurite_skeletons(rng, extent, bounds, direction, wiggle, max_branches, branch_probability)
        for branch_index, skeleton in enumerate(skeletons):
            if len(skeleton) < 2:
                continue
            radius0 = base_radius if branch_index == 0 else max(3.0, base_radius * rng.uniform(0.4, 0.7))
            radii = _tube_radii(rng, skeleton, radius0, is_dendrite, neurite_id, parts.boutons)
            parts.add(skeleton, radii, neurite_id, extent)
            parts.mitochondria += _tube_mitochondria(rng, skeleton, radii, is_dendrite, neurite_id)
    return parts.finish()


def _voxel_indices(points: np.ndarray, anisotropy: float, shape: Shape3D) -> tuple[np.ndarray, np.ndarray]:
    """Nearest voxel (Z, Y, X) of physical points, and which of them fall inside ``shape``."""
    index = np.rint(points / np.array([anisotropy, 1.0, 1.0])).astype(np.int64)
    inside = np.all((index >= 0) & (index < np.array(shape)), axis=1)
    return index, inside


def _dense_labels(tubes: _Tubes, shape: Shape3D, anisotropy: float) -> np.ndarray:
    """(Z, Y, X) int64 ids with no gaps: each voxel goes to the tube whose surface is nearest.

    This is an additively weighted Voronoi partition (distance to the skeleton minus the local
    radius), computed with one distance transform per radius bin. It packs the volume densely and
    gives big neurites big territories.
    """
    index, inside = _voxel_indices(tubes.points, anisotropy, shape)
    index, radii, ids = index[inside], tubes.radii[inside], tubes.ids[inside]
    edges = np.geomspace(2.5, max(float(radii.max()), 3.0) + 1e-6, 9)
    best_score = np.full(shape, np.inf, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int64)
    sampling = (anisotropy, 1.0, 1.0)
    for low, high in zip(edges[:-1], edges[1:]):
        chosen = (radii >= low) & (radii < high) if high < edges[-1] else radii >= low
        if not np.any(chosen):
            continue
        # Within a bin, the larger radius wins a shared voxel.
        order = np.argsort(radii[chosen])
        marker_ids = np.zeros(shape, dtype=np.int64)
        marker_radii = np.zeros(shape, dtype=np.float32)
        z, y, x = index[chosen][order].T
        marker_ids[z, y, x] = ids[chosen][order]
        marker_radii[z, y, x] = radii[chosen][order]
        distance, nearest = ndi.distance_transform_edt(
            marker_ids == 0, sampling=sampling, return_indices=True
        )
        nearest = tuple(nearest)
        score = distance.astype(np.float32) - marker_radii[nearest]
        better = score < best_score
        best_score[better] = score[better]
        labels[better] = marker_ids[nearest][better]
    return labels


def _absorb_fragments(labels: np.ndarray, min_voxels: int, anisotropy: float) -> np.ndarray:
    """Gives 6-connected pieces smaller than ``min_voxels`` to their nearest larger neighbours.

    Overlapping tubes leave slivers of a neurite in the partition; real neurites have no such
    crumbs, so they are dissolved before membranes are drawn.
    """
    components = cc3d.connected_components(labels, connectivity=6, out_dtype=np.uint32)
    sizes = np.bincount(components.ravel())
    small = (sizes < min_voxels)[components]
    if not np.any(small) or np.all(small):
        return labels
    nearest = ndi.distance_transform_edt(
        small, sampling=(anisotropy, 1.0, 1.0), return_distances=False, return_indices=True
    )
    return labels[tuple(nearest)]


def _smooth_noise(rng: np.random.Generator, shape: Shape3D, sigma: Sequence[float]) -> np.ndarray:
    """(Z, Y, X) float32 Gaussian-filtered white noise, rescaled to unit standard deviation."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / (field.std() + 1e-6)


def _warp_sections(rng: np.random.Generator, labels: np.ndarray, amplitude: float) -> np.ndarray:
    """Labels resampled through a smooth in-plane displacement: makes membranes wavy, not geometric."""
    shape = labels.shape
    dy = _smooth_noise(rng, shape, (1.0, 8.0, 8.0)) * amplitude
    dx = _smooth_noise(rng, shape, (1.0, 8.0, 8.0)) * amplitude
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    coordinates = np.stack(np.broadcast_arrays(z, y + dy, x + dx))
    return ndi.map_coordinates(labels, coordinates, order=0, mode="nearest")


def _membrane_mask(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool: in-plane interfaces between ids, 1 px on one side, 2 px where a field says so."""
    hashed = (labels.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(4294967291)
    one_sided = np.zeros(labels.shape, dtype=bool)
    two_sided = np.zeros(labels.shape, dtype=bool)
    for axis in (1, 2):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        differs = labels[a] != labels[b]
        a_lower = hashed[a] < hashed[b]
        one_sided[a] |= differs & a_lower
        one_sided[b] |= differs & ~a_lower
        two_sided[a] |= differs
        two_sided[b] |= differs
    thick = _smooth_noise(rng, labels.shape, (1.0, 10.0, 10.0)) > 0.0
    return one_sided | (two_sided & thick)


def _organelles(
    tubes: _Tubes, labels: np.ndarray, membranes: np.ndarray, anisotropy: float
) -> tuple[np.ndarray, np.ndarray]:
    """(Z, Y, X) bool masks of mitochondria and vesicle clusters, each inside its owner neurite."""
    shape = labels.shape
    marker_kind = np.zeros(shape, dtype=np.int8)  # 1 mitochondrion, 2 vesicle cluster
    marker_radius = np.zeros(shape, dtype=np.float32)
    marker_owner = np.zeros(shape, dtype=np.int64)
    for kind, items in ((2, [(c[None], r, o) for c, r, o in tubes.boutons]), (1, tubes.mitochondria)):
        for points, radius, owner in items:
            index, inside = _voxel_indices(points, anisotropy, shape)
            z, y, x = index[inside].T
            marker_kind[z, y, x], marker_radius[z, y, x], marker_owner[z, y, x] = kind, radius, owner
    if not np.any(marker_kind):
        empty = np.zeros(shape, dtype=bool)
        return empty, empty
    distance, nearest = ndi.distance_transform_edt(
        marker_kind == 0, sampling=(anisotropy, 1.0, 1.0), return_indices=True
    )
    nearest = tuple(nearest)
    within = (distance <= marker_radius[nearest]) & (labels == marker_owner[nearest])
    # Organelles stay clear of the membrane, so they never touch a boundary.
    within &= ~ndi.binary_dilation(membranes, structure=np.ones((1, 5, 5), dtype=bool))
    kind = marker_kind[nearest]
    return within & (kind == 1), within & (kind == 2)


def _render(
    rng: np.random.Generator,
    labels: np.ndarray,
    membranes: np.ndarray,
    mitochondria: np.ndarray,
    vesicle_clusters: np.ndarray,
    membrane_gaps: float,
    noise: float,
) -> np.ndarray:
    """(Z, Y, X) float32 raw intensities (0..255 scale) before section defects and quantisation."""
    shape = labels.shape
    # Cytoplasm: a grey level per neurite, some darker ones, plus fine and coarse texture.
    unique_ids, inverse = np.unique(labels, return_inverse=True)
    base = rng.normal(186.0, 11.0, len(unique_ids))
    dark = rng.random(len(unique_ids)) < 0.12
    base[dark] = rng.uniform(135.0, 160.0, int(dark.sum()))
    raw = base[inverse.reshape(shape)].astype(np.float32)
    raw += 12.0 * _smooth_noise(rng, shape, (0.5, 1.0, 1.0))
    raw += 7.0 * _smooth_noise(rng, shape, (1.0, 6.0, 6.0))

    # Vesicles (~40 nm, about 7 px): dark rings with lighter centres, packed in bouton clusters,
    # sparse elsewhere (standing in for vesicles, microtubules and other small dark organelles).
    inside = ~ndi.binary_dilation(membranes, structure=np.ones((1, 5, 5), dtype=bool))
    density = np.where(vesicle_clusters, 0.014, 0.0012).astype(np.float32) * inside
    impulses = (rng.random(shape, dtype=np.float32) < density).astype(np.float32)
    wide = ndi.gaussian_filter(impulses, (0.0, 1.8, 1.8)) * (2.0 * np.pi * 1.8**2)
    narrow = ndi.gaussian_filter(impulses, (0.0, 0.9, 0.9)) * (2.0 * np.pi * 0.9**2)
    raw -= 120.0 * np.clip(wide - 0.75 * narrow, 0.0, 0.6)

    # Mitochondria: dark, textured by cristae-like stripes, with a darker rim.
    if np.any(mitochondria):
        angle = rng.uniform(0.0, np.pi)
        _, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
        phase = 1.1 * (np.cos(angle) * x + np.sin(angle) * y) + 3.0 * _smooth_noise(
            rng, shape, (1.0, 8.0, 8.0)
        )
        stripes = np.tanh(2.0 * np.sin(phase))
        mito_value = 78.0 + 20.0 * stripes + 6.0 * rng.standard_normal(shape).astype(np.float32)
        soft = ndi.gaussian_filter(mitochondria.astype(np.float32), (0.0, 0.8, 0.8))
        raw = raw * (1.0 - soft) + mito_value * soft
        rim = mitochondria & ~ndi.binary_erosion(mitochondria, structure=np.ones((1, 3, 3), dtype=bool))
        raw -= 30.0 * ndi.gaussian_filter(rim.astype(np.float32), (0.0, 0.7, 0.7))

    # Membranes: dark lines whose contrast varies along them and fades out in places (gaps).
    contrast = 0.85 + 0.15 * _smooth_noise(rng, shape, (1.0, 4.0, 4.0))
    if membrane_gaps > 0:
        fade = _smooth_noise(rng, shape, (0.7, 5.0, 5.0))
        threshold = float(np.quantile(fade, 1.0 - membrane_gaps))
        contrast *= 1.0 - 0.8 * np.clip((fade - threshold) / 0.4, 0.0, 1.0)
    line = ndi.gaussian_filter(membranes.astype(np.float32), (0.0, 0.8, 0.8)) / 0.5
    raw -= 140.0 * np.clip(line, 0.0, 1.0) * np.clip(contrast, 0.0, 1.0)

    # Imaging: section blur, per-section brightness/contrast drift, noise.
    raw = ndi.gaussian_filter(raw, (0.0, 0.9, 0.9))
    gain = rng.normal(1.0, 0.04, (shape[0], 1, 1)).astype(np.float32)
    offset = rng.normal(0.0, 5.0, (shape[0], 1, 1)).astype(np.float32)
    mean = float(raw.mean())
    raw = (raw - mean) * gain + mean + offset
    raw += noise * rng.standard_normal(shape, dtype=np.float32)
    return raw


def _section_defects(rng: np.random.Generator, raw: np.ndarray) -> tuple[np.ndarray, dict[str, list]]:
    """Applies missing / low-contrast / blurred sections to float raw (Z, Y, X) in place; returns the log."""
    depth = raw.shape[0]
    scale = max(1, depth // 16)
    order = rng.permutation(np.arange(1, depth - 1)) if depth > 2 else np.arange(depth)
    n_missing, n_low, n_blur = (int(rng.integers(0, scale + 1)) for _ in range(3))
    n_missing = min(n_missing, 1 + depth // 24)
    missing = sorted(int(z) for z in order[:n_missing])
    low = sorted(int(z) for z in order[n_missing : n_missing + n_low])
    blurred = sorted(int(z) for z in order[n_missing + n_low : n_missing + n_low + n_blur])
    mean = float(raw.mean())
    for z in missing:
        raw[z] = rng.uniform(20.0, 60.0) + 6.0 * rng.standard_normal(raw.shape[1:]).astype(np.float32)
    for z in low:
        raw[z] = mean + (raw[z] - mean) * rng.uniform(0.3, 0.45)
    for z in blurred:
        raw[z] = ndi.gaussian_filter(raw[z], rng.uniform(1.8, 2.8))
    return raw, {"missing": missing, "low_contrast": low, "blurred": blurred}


def _section_offsets(
    rng: np.random.Generator, depth: int, defects: bool
) -> tuple[np.ndarray, dict[str, list]]:
    """(Z, 2) in-plane crop offsets: zero, or with ``defects`` a few jittered sections and a step shift."""
    offsets = np.zeros((depth, 2), dtype=np.int64)
    if not defects or depth < 4:
        return offsets, {"misaligned": [], "step_shift": []}
    limit = min(_MARGIN_XY // 2, 4)
    jittered = sorted(
        int(z) for z in rng.choice(np.arange(1, depth - 1), int(rng.integers(1, 3)), replace=False)
    )
    for z in jittered:
        offsets[z] = rng.integers(-limit, limit + 1, 2)
    step_shift: list = []
    if rng.random() < 0.5:
        start = int(rng.integers(depth // 4, 3 * depth // 4))
        shift = rng.integers(-2, 3, 2)
        offsets[start:] += shift
        step_shift = [start, int(shift[0]), int(shift[1])]
    offsets = np.clip(offsets, -_MARGIN_XY, _MARGIN_XY)
    return offsets, {"misaligned": jittered, "step_shift": step_shift}


def _check_volume_request(shape: Sequence[int], seed: int) -> Shape3D:
    """The (Z, Y, X) shape as ints; raises DataError for a bad shape or a negative seed."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"shape must be three positive sizes (z, y, x), got {shape}")
    if int(seed) < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    return shape  # type: ignore[return-value]


def _neurite_partition(
    rng: np.random.Generator,
    grid: Shape3D,
    anisotropy: float,
    fill_fraction: float,
    radius_scale: float,
    branch_probability: float,
    min_fragment_voxels: int,
) -> tuple[_Tubes, np.ndarray]:
    """Traced tubes and the dense (Z, Y, X) int64 neurite partition of the working ``grid`` (no membranes yet)."""
    # Tubes live in the working grid's physical frame: voxel (z, y, x) sits at (z * anisotropy, y, x).
    extent = np.array([(grid[0] - 1) * anisotropy, grid[1] - 1, grid[2] - 1], dtype=np.float64)
    tubes = _trace_tubes(rng, extent, fill_fraction, radius_scale, branch_probability)
    dense = _dense_labels(tubes, grid, anisotropy)
    dense = _warp_sections(rng, dense, amplitude=2.8)
    return tubes, _absorb_fragments(dense, min_fragment_voxels, anisotropy)


def _render_grid(
    rng: np.random.Generator, tubes: _Tubes, dense: np.ndarray, anisotropy: float, membrane_gaps: float, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """Membranes, organelles and raw for the (Z, Y, X) partition ``dense``.

    Returns float32 raw and int64 labels (0 on membranes), both of the grid's shape.
    """
    membranes = _membrane_mask(rng, dense)
    mitochondria, vesicle_clusters = _organelles(tubes, dense, membranes, anisotropy)
    raw = _render(rng, dense, membranes, mitochondria, vesicle_clusters, membrane_gaps, noise)
    return raw, np.where(membranes, 0, dense)


def _crop_sections(
    raw: np.ndarray, labels: np.ndarray, shape: Shape3D, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts the (Z, Y, X) ``shape`` out of the working grid, each section shifted by its (Z, 2) offset.

    Returns float32 raw and int64 labels of ``shape``.
    """
    raw_out = np.empty(shape, dtype=np.float32)
    labels_out = np.empty(shape, dtype=np.int64)
    for z in range(shape[0]):
        y0, x0 = _MARGIN_XY + offsets[z]
        raw_out[z] = raw[z + _MARGIN_Z, y0 : y0 + shape[1], x0 : x0 + shape[2]]
        labels_out[z] = labels[z + _MARGIN_Z, y0 : y0 + shape[1], x0 : x0 + shape[2]]
    return raw_out, labels_out


def _object_labels(labels: np.ndarray, min_object_voxels: int) -> np.ndarray:
    """(Z, Y, X) uint32 ids 1..N of the 6-connected pieces of ``labels``; pieces below the size become 0."""
    components = cc3d.connected_components(labels, connectivity=6, out_dtype=np.uint32)
    sizes = np.bincount(components.ravel())
    small = np.flatnonzero(sizes < min_object_voxels)
    small = small[small > 0]
    if len(small):
        components = fastremap.mask(components, small)
    components, _ = fastremap.renumber(components, in_place=True)
    return components.astype(np.uint32, copy=False)


def generate_volume(
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    *,
    anisotropy: float = 5.0,
    fill_fraction: float = 0.6,
    radius_scale: float = 1.0,
    branch_probability: float = 0.35,
    membrane_gaps: float = 0.1,
    noise: float = 9.0,
    defects: bool = False,
    min_fragment_voxels: int = 400,
    min_object_voxels: int = 50,
    return_info: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict]:
    """One synthetic anisotropic EM volume of neuropil and its dense neuron labels.

    Args:
        shape: (Z, Y, X) output size in voxels.
        seed: random seed; the same seed and parameters give bit-identical arrays.
        anisotropy: section thickness over in-plane pixel size (SNEMI3D: 30 nm / 6 nm = 5).
        fill_fraction: summed tube volume, as a fraction of the box, at which tracing stops; more
            means more and thinner objects.
        radius_scale: multiplies all neurite radii (in-plane pixels).
        branch_probability: chance of a branch per axon (dendrites get up to three).
        membrane_gaps: fraction of membrane area that fades to low contrast (0 = all crisp).
        noise: standard deviation of additive Gaussian noise, in grey levels.
        defects: add section defects: up to a few missing, low-contrast or blurred sections, one or
            two misaligned sections and possibly a step shift of the stack (raw and labels move
            together, as a tracer would annotate the misaligned stack).
        min_fragment_voxels: pieces of the dense partition smaller than this are absorbed by
            their neighbours before membranes are drawn (no crumbs between neurites).
        min_object_voxels: connected pieces smaller than this become label 0 (unlabelled).
        return_info: also return a dict describing the defects and the object count.

    Returns:
        raw: (Z, Y, X) uint8, membranes dark on a light cytoplasm.
        labels: (Z, Y, X) uint32, 0 = boundary/unlabelled, 1..N neurites, each one 6-connected
            component.
        info: only with ``return_info``.
    """
    shape = _check_volume_request(shape, seed)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E6]))
    grid: Shape3D = (shape[0] + 2 * _MARGIN_Z, shape[1] + 2 * _MARGIN_XY, shape[2] + 2 * _MARGIN_XY)
    tubes, dense = _neurite_partition(
        rng, grid, anisotropy, fill_fraction, radius_scale, branch_probability, min_fragment_voxels
    )
    raw, labels = _render_grid(rng, tubes, dense, anisotropy, membrane_gaps, noise)

    offsets, alignment = _section_offsets(rng, shape[0], defects)
    raw_out, labels_out = _crop_sections(raw, labels, shape, offsets)
    defect_log: dict[str, list] = {"missing": [], "low_contrast": [], "blurred": []}
    if defects:
        raw_out, defect_log = _section_defects(rng, raw_out)
    defect_log.update(alignment)

    components = _object_labels(labels_out, min_object_voxels)
    raw_uint8 = np.clip(np.rint(raw_out), 0, 255).astype(np.uint8)
    if not return_info:
        return raw_uint8, components
    info = {
        "n_objects": int(components.max()),
        "boundary_fraction": float(np.mean(components == 0)),
        "defects": defect_log,
    }
    return raw_uint8, components, info


def _volume_seed(seed: int, split: str, index: int) -> int:
    """Independent, reproducible seed per (dataset seed, split, volume index)."""
    split_code = {"train": 1, "val": 2, "test": 3}.get(split, sum(map(ord, split)))
    return int(np.random.SeedSequence([int(seed), split_code, int(index)]).generate_state(1)[0])


def write_dataset_file(
    path: str | os.PathLike, raw: np.ndarray, labels: np.ndarray, attributes: dict | None = None
) -> Path:
    """Writes raw (``volume``) and ``labels`` gzip-compressed to an HDF5 file, atomically (a full
    disk is a one-line DataError; the file gets the usual 0666 & ~umask permissions)."""
    path = Path(path)
    with create_hdf5(path) as handle:
        chunks = tuple(min(n, c) for n, c in zip(raw.shape, (16, 64, 64)))
        handle.create_dataset("volume", data=raw, compression="gzip", compression_opts=4, chunks=chunks)
        handle.create_dataset("labels", data=labels, compression="gzip", compression_opts=4, chunks=chunks)
        for key, value in (attributes or {}).items():
            handle.attrs[key] = value
    return path


def generate_dataset(
    out: str | os.PathLike,
    seed: int = 0,
    *,
    shape: Sequence[int] = DEFAULT_SHAPE,
    splits: dict[str, int] | None = None,
    defect_splits: Sequence[str] = DEFAULT_DEFECT_SPLITS,
    **params: float,
) -> list[Path]:
    """Writes ``<out>/<split>/synthetic_<split>_<i>.hdf`` for every split (the layout of docs/ARCHITECTURE.md).

    Args:
        out: dataset root folder.
        seed: dataset seed; each volume gets its own seed derived from (seed, split, index).
        shape: (Z, Y, X) of every volume.
        splits: volumes per split, default train 2, val 1, test 1.
        defect_splits: splits whose volumes get section defects (default: train only).
        **params: passed to :func:`generate_volume` (e.g. ``anisotropy``, ``noise``).

    Returns:
        The written file paths.
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    written = []
    for split, count in splits.items():
        for index in range(count):
            volume_seed = _volume_seed(seed, split, index)
            start = time.perf_counter()
            raw, labels, info = generate_volume(
                shape, volume_seed, defects=split in defect_splits, return_info=True, **params
            )
            attributes = {
                "generator": "melecole.data.synthetic",
                "dataset_seed": int(seed),
                "volume_seed": volume_seed,
                "resolution_nm": list(RESOLUTION_NM),
                "params": json.dumps(params, sort_keys=True),
                "defects": json.dumps(info["defects"], sort_keys=True),
            }
            path = write_dataset_file(
                Path(out) / split / f"synthetic_{split}_{index:02d}.hdf", raw, labels, attributes
            )
            logger.info(
                "%s: %s, %d objects, %.1f%% boundary, %.1f s",
                path,
                raw.shape,
                info["n_objects"],
                100 * info["boundary_fraction"],
                time.perf_counter() - start,
            )
            written.append(path)
    return written


def threshold_baseline(
    raw: np.ndarray, labels: np.ndarray, thresholds: Sequence[float] | None = None
) -> dict[str, float]:
    """Naive baseline: threshold raw, 3D connected components (6-connected), best of thresholds.

    :func:`melecole.evaluation.best_threshold_baseline` on the raw intensities: VI split =
    H(seg | gt) and merge = H(gt | seg) in bits and the adapted Rand error, GT label 0 ignored. The
    threshold with the lowest VI (split + merge) is reported.

    Returns:
        dict with threshold, vi_split, vi_merge, vi, arand.
    """
    from melecole.evaluation import best_threshold_baseline

    if thresholds is None:
        thresholds = np.arange(60, 200, 10)
    best = best_threshold_baseline(raw, labels, thresholds)
    scores = best.scores
    return {
        "threshold": best.threshold,
        "vi_split": scores.vi_split,
        "vi_merge": scores.vi_merge,
        "vi": scores.vi_total,
        "arand": scores.arand,
    }


def dataset_files(out: str | os.PathLike, splits: dict[str, int] | None = None) -> list[Path]:
    """The files :func:`generate_dataset` writes: ``<out>/<split>/synthetic_<split>_<i>.hdf``."""
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    names = [(split, index) for split, count in splits.items() for index in range(count)]
    return [Path(out) / split / f"synthetic_{split}_{index:02d}.hdf" for split, index in names]


def check_output(out: str | os.PathLike, seed: int, *, overwrite: bool = False) -> None:
    """Checks the CLI's --out and --seed before anything is generated.

    Raises:
        DataError: a negative seed, an --out that is a file or cannot be written, or an existing
            dataset there without ``overwrite``.
    """
    if seed < 0:
        raise DataError(f"--seed: {seed}, expected an integer >= 0")
    for folder in [Path(out)] + sorted({path.parent for path in dataset_files(out)}):
        check_writable_folder(folder, f"--out '{out}'")
    existing = [path for path in dataset_files(out) if path.exists()]
    if existing and not overwrite:
        raise DataError(
            f"--out '{out}': a dataset exists there ({len(existing)} files, e.g. {existing[0]}), "
            "expected a new folder (or pass --overwrite to replace it)"
        )


def ensure_synthetic_data(data_root: str | os.PathLike, seed: int = 0) -> bool:
    """Generates the dataset into ``data_root`` if it is missing and its folder name says ``synthetic``
    (what ``make demo`` needs); True if it was made. An existing train/ + val/ is left alone."""
    root = Path(data_root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return False
    if "synthetic" not in root.name:
        return False
    get_logger().info("generating the synthetic dataset in %s (seed %d)", root, seed)
    generate_dataset(root, seed)
    return True


if __name__ == "__main__":  # python -m melecole.data.synthetic: the command line is melecole/cli/synthetic.py
    from melecole.cli.synthetic import main

    raise SystemExit(main())
