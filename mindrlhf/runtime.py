"""MindSpore process set-up shared by every stage entry point."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    rank: int = 0  # data-parallel rank: which shard of each batch this process reads
    size: int = 1  # data-parallel size
    global_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only global rank 0 writes artifacts and results."""
        return self.global_rank == 0


def under_msrun() -> bool:
    return "MS_ROLE" in os.environ and "MS_WORKER_NUM" in os.environ


def init_runtime(device_target: str = "CPU", seed: int = 0, parallel=None) -> Dist:
    """PyNative mode on ``device_target`` (graph mode for semi-auto parallel on Ascend); joins the
    collective group when launched by msrun and applies the config's parallel context."""
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

        from .config import ParallelConfig
        from .parallel import auto_parallel_context

        parallel = parallel or ParallelConfig(worker_num=int(os.environ["MS_WORKER_NUM"]))
        if parallel.mode == "semi_auto":
            ms.set_context(mode=ms.GRAPH_MODE)
        init()
        ms.set_auto_parallel_context(**auto_parallel_context(parallel))
        size = get_group_size()
        if parallel.mode == "semi_auto":  # ranks that share a data shard count as one data rank
            return Dist(
                get_rank() // (size // parallel.data_parallel), parallel.data_parallel, get_rank()
            )
        return Dist(get_rank(), size, get_rank())
    return Dist()
