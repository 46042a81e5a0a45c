"""Segmentation algorithms on numpy arrays: no torch, no files (docs/ARCHITECTURE.md).

Used by whole-volume inference (:mod:`melecole.inference.pipeline`) and by the blockwise tasks
(:mod:`melecole.blockwise`) alike, so both run one algorithm on two schedules. Modules, lowest first:

- ``mws``: voxel mutex watershed (bioimage-cpp) and its edge weights;
- ``postprocess``: small-segment removal, background fill;
- ``fragments``: fragments of a (padded) block, :data:`FRAGMENT_ALGORITHMS` (mws, watershed);
- ``region_graph``: edges between fragments with affinity statistics, summed over blocks;
- ``agglomeration``: fragment -> segment lookup table, :data:`AGGLOMERATION_MODES` (mws, mean);
- ``relabel``: a block's fragments -> segment ids, background filled;
- ``options``: :class:`SegmentationOptions`, the one options type of both schedules.
"""
