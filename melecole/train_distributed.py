"""Train on HARDWARE.NUM_GPUS processes of one node, or as one worker of a torchrun launch.

    python melecole/train_distributed.py --config configs/SNEMI3D-UNet3D.yaml HARDWARE.NUM_GPUS 4
                                         [--supervised_checkpoint CKPT] [--resume RUN] [KEY VALUE ...]

One process per GPU (NCCL), or CPU processes with HARDWARE.DEVICE cpu (gloo). OPTIM.BATCH_SIZE is
per process. When torchrun's variables are set, HARDWARE.NUM_GPUS is ignored and this process joins
that launch; several nodes, e.g. 2 nodes with 4 GPUs each (run on every node, NODE_RANK 0 and 1):

    torchrun --nnodes 2 --nproc_per_node 4 --node_rank NODE_RANK --master_addr HOST_OF_NODE_0 \\
        --master_port 29500 melecole/train_distributed.py --config configs/SNEMI3D-UNet3D.yaml
"""

from __future__ import annotations

import sys

from melecole.engine.distributed import train_distributed
from melecole.engine.launch import build_train_parser
from melecole.utils.cli import run_cli


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_train_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    return train_distributed(args)


if __name__ == "__main__":
    sys.exit(main())
