"""Vectorised metric loss vs the plain loop reference on one SNEMI-sized patch.

Run: ``python bench/bench_loss.py [--objects 100] [--repeats 5] [--threads 1]``. Prints both loss
values, their difference and the forward + backward time of each (median of ``--repeats`` runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Tuple

import torch

from melecole.losses import MetricLoss
from melecole.testing import reference_metric_loss


def voronoi_labels(shape: Tuple[int, int, int], objects: int, generator: torch.Generator) -> torch.Tensor:
    """(Z, Y, X) int64 labels 1..objects: nearest of ``objects`` random seeds (anisotropic, z x5),
    with voxels nearly equidistant to two seeds set to 0 as a boundary."""
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in shape), indexing="ij"), -1
    )
    seeds = torch.rand(objects, 3, generator=generator) * torch.tensor(shape, dtype=torch.float32)
    scale = torch.tensor([5.0, 1.0, 1.0])  # EM sections are ~5x thicker than the in-plane pixels
    distances = torch.cdist((grid * scale).reshape(-1, 3), seeds * scale)  # (voxels, objects)
    nearest = distances.topk(2, dim=1, largest=False)
    labels = nearest.indices[:, 0] + 1
    labels[(nearest.values[:, 1] - nearest.values[:, 0]) < 1.0] = 0
    return labels.reshape(shape)


def time_forward_backward(step: Callable[[], torch.Tensor], repeats: int) -> Tuple[float, float]:
    """(loss value, median seconds) of ``step()`` + backward over ``repeats`` runs after a warm-up."""
    value = step()
    value.backward()
    value = value.detach()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        loss.backward()
        times.append(time.perf_counter() - start)
    return value.item(), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[20, 128, 128], metavar=("Z", "Y", "X"))
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    generator = torch.Generator().manual_seed(0)
    shape = tuple(arguments.shape)
    labels = voronoi_labels(shape, arguments.objects, generator)[None]  # (1, Z, Y, X)
    embedding = torch.randn(1, arguments.embedding_dim, *shape, generator=generator, requires_grad=True)
    present = int((torch.unique(labels) != 0).sum())
    labelled = float((labels != 0).float().mean())

    rows = []
    for norm in ("l2", "l1"):
        criterion = MetricLoss(delta_v=0.5, delta_d=1.5, gamma=0.001, norm=norm, foreground_weight=0.0)

        def vectorised(criterion: MetricLoss = criterion) -> torch.Tensor:
            return criterion({"embedding": embedding}, labels)[1]["metric"]

        def loop(norm: str = norm) -> torch.Tensor:
            return reference_metric_loss(embedding, labels, 0.5, 1.5, gamma=0.001, norm=norm)["metric"]

        fast_value, fast_time = time_forward_backward(vectorised, arguments.repeats)
        slow_value, slow_time = time_forward_backward(loop, arguments.repeats)
        rows.append((norm, fast_value, slow_value, abs(fast_value - slow_value), fast_time, slow_time))

    print(
        f"patch {list(shape)}, E={arguments.embedding_dim}, {present} objects, "
        f"{labelled:.0%} voxels labelled, {torch.get_num_threads()} thread(s), "
        f"forward+backward median of {arguments.repeats}"
    )
    header = (
        f"{'norm':<5}{'vectorised':>14}{'loop':>14}{'|diff|':>11}"
        f"{'vec ms':>10}{'loop ms':>10}{'speed-up':>10}"
    )
    print(header)
    print("-" * len(header))
    for norm, fast_value, slow_value, difference, fast_time, slow_time in rows:
        print(
            f"{norm:<5}{fast_value:>14.6f}{slow_value:>14.6f}{difference:>11.2e}"
            f"{1000 * fast_time:>10.1f}{1000 * slow_time:>10.1f}{slow_time / fast_time:>9.1f}x"
        )


if __name__ == "__main__":
    main()
