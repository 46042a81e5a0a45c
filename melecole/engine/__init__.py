"""Training engine.

- ``trainer``: the one training loop (``Trainer``), run folders, resume.
- ``loaders``: the batches of a run (labelled patches, MoCo view pairs, or both).
- ``checkpoint``: self-describing checkpoints (save, load, shape checks, backbone loading).
- ``optim``: optimizer and learning-rate schedule.
- ``launch``: worker processes for multi-process training (spawned here, or under torchrun).
- ``cli``: argument parsing and the ``melecole-train`` / ``melecole-train-distributed`` entry points.

The losses themselves are objectives in :mod:`melecole.losses.objectives`.
"""
