"""HARDWARE.NUM_THREADS auto: every core goes to the model, split among the node's processes."""

import torch

from melecole.utils.device import configure_threads, usable_cpu_count


def test_auto_threads_use_every_core_whatever_the_loader_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        cpu = torch.device("cpu")
        assert configure_threads(cpu, 0, num_workers=1) == usable_cpu_count()
        assert torch.get_num_threads() == usable_cpu_count()
        assert configure_threads(cpu, 0, num_workers=4, local_processes=2) == max(1, usable_cpu_count() // 2)
        assert configure_threads(cpu, 3, num_workers=1) == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads(cpu, 0, num_workers=1) is None  # the user's OMP_NUM_THREADS stands
    finally:
        torch.set_num_threads(before)
