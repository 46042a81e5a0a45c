"""Training engine.

- ``trainer``: the one training loop (``Trainer``), resume.
- ``run_folder``: run folders: made with the marker ``.melecole-run.json``, written again only when
  recognised as the library's own; a run that never saved a checkpoint is explained on --resume.
- ``loaders``: the batches of a run (labelled patches, MoCo view pairs, or both).
- ``checkpoint``: self-describing checkpoints (save, load, shape checks, backbone loading).
- ``optim``: optimizer and learning-rate schedule.
- ``launch``: worker processes for multi-process training (spawned here, or under torchrun).

The losses themselves are objectives in :mod:`melecole.losses.objectives`.
"""
