"""Every command line of MeLeCoLe: arguments -> config -> one library call (layer 7, on top of all).

- ``train``: ``melecole-train`` / ``python melecole/train.py`` and ``melecole-train-distributed`` /
  ``python melecole/train_distributed.py`` (the launcher is :mod:`melecole.engine.launch`).
- ``infer``: ``melecole-infer`` / ``python infer.py`` (:mod:`melecole.inference`; ``--blockwise``:
  :func:`melecole.blockwise.orchestrate.infer_blockwise`).
- ``evaluate``: ``melecole-evaluate`` / ``python variation_of_information.py`` (:mod:`melecole.evaluation`).
- ``view``: ``melecole-view`` / ``python -i view.py`` (:mod:`melecole.visualization`).
- ``blockwise``: ``melecole-blockwise`` / ``python -m melecole.blockwise`` (:mod:`melecole.blockwise`).
- ``demo``: ``make demo`` / ``python -m melecole.demo``: data -> train -> infer -> evaluate, one table.
- ``synthetic``: ``python -m melecole.data.synthetic``: the synthetic dataset (:mod:`melecole.data.synthetic`).

The script paths above are shims that only import ``main`` from here. No library module imports this
package (tests/test_architecture.py checks it). The shims end with :func:`exit_script`.
"""

from melecole.utils.cli import exit_script

__all__ = ["exit_script"]
