"""Sliding-window inference and mutex watershed for a checkpoint (`python infer.py --help`).

    python infer.py --split val --config configs/X.yaml --checkpoint RUN/checkpoints/last.pt

The command line is melecole/cli/infer.py (also installed as `melecole-infer`).
"""

from melecole.cli.infer import main

if __name__ == "__main__":
    raise SystemExit(main())
