"""MindSpore process set-up shared by every stage entry point."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_msrun() -> bool:
    return "MS_ROLE" in os.environ and "MS_WORKER_NUM" in os.environ


def init_runtime(device_target: str = "CPU", seed: int = 0) -> Dist:
    """PyNative mode on ``device_target``; joins the collective group when launched by msrun."""
    import mindspore as ms

    ms.set_device(device_target)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    if device_target == "CPU":
        # Asynchronous op dispatch costs a scheduler tick per small op on few-core CPUs; measured
        # 50-100x lower per-op latency when synchronous (see README, "Why plain MindSpore").
        ms.set_context(pynative_synchronize=True)
    ms.set_seed(seed)
    if under_msrun():
        from mindspore.communication import get_group_size, get_rank, init

        init()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        return Dist(get_rank(), get_group_size())
    return Dist()
