"""Train on HARDWARE.NUM_GPUS processes of one node, or as one worker of a torchrun launch.

    python melecole/train_distributed.py --config configs/SNEMI3D-UNet3D.yaml HARDWARE.NUM_GPUS 4
                                         [--supervised_checkpoint CKPT] [--resume RUN] [KEY VALUE ...]

One process per GPU (NCCL), or CPU processes with HARDWARE.DEVICE cpu (gloo). OPTIM.BATCH_SIZE is
per process. When torchrun's variables are set, HARDWARE.NUM_GPUS is ignored and this process joins
that launch; several nodes, e.g. 2 nodes with 4 GPUs each (run on every node, NODE_RANK 0 and 1):

    torchrun --nnodes 2 --nproc_per_node 4 --node_rank NODE_RANK --master_addr HOST_OF_NODE_0 \\
        --master_port 29500 melecole/train_distributed.py --config configs/SNEMI3D-UNet3D.yaml

The same as the ``melecole-train-distributed`` console script
(:func:`melecole.cli.train.train_distributed_main`).
"""

from __future__ import annotations

from melecole.cli import exit_script
from melecole.cli.train import train_distributed_main as main

__all__ = ["main"]

if __name__ == "__main__":
    exit_script(main())
