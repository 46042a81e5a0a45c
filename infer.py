"""Sliding-window inference and mutex watershed for a checkpoint (`python infer.py --help`).

    python infer.py --split val --config configs/X.yaml --checkpoint RUN/checkpoints/last.pt

The library side is melecole/inference/cli.py (also installed as `melecole-infer`).
"""

from melecole.inference.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
