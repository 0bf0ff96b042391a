"""MindSpore parallel settings from the config's ``parallel`` section.

Data parallel (CPU and NPU) is set up in :mod:`mindrlhf.runtime`. For Ascend clusters,
``mode: semi_auto`` passes the sizes through to MindSpore's semi-automatic parallel: the auto
parallel context (pipeline stages, optimizer sharding), shard strategies on the model's matmuls
(column-parallel q/k/v/up/gate, row-parallel o/down, Megatron style) and recompute per block.
"""

from __future__ import annotations

from .config import ParallelConfig


def auto_parallel_context(p: ParallelConfig) -> dict:
    """Keyword arguments for ``mindspore.set_auto_parallel_context``."""
    import mindspore as ms

    if p.mode == "data_parallel":
        return {"parallel_mode": ms.ParallelMode.DATA_PARALLEL, "gradients_mean": True}
    return {
        "parallel_mode": ms.ParallelMode.SEMI_AUTO_PARALLEL,
        "gradients_mean": True,
        "device_num": p.worker_num,
        "pipeline_stages": p.pipeline_stages,
        "enable_parallel_optimizer": p.optimizer_shard,
        "full_batch": False,
    }


def matmul_strategies(p: ParallelConfig) -> dict[str, tuple]:
    """Shard strategy per projection for ``MatMul(transpose_b=True)`` on (tokens, d) x (out, d):
    activations split by data parallel; weights split on out (column) or in (row) by model
    parallel."""
    dp, mp = p.data_parallel, p.model_parallel
    column = ((dp, 1), (mp, 1))
    row = ((dp, mp), (1, mp))
    return {
        "q_proj": column,
        "k_proj": column,
        "v_proj": column,
        "up_proj": column,
        "gate_proj": column,
        "o_proj": row,
        "down_proj": row,
    }


def apply_parallel(model, p: ParallelConfig) -> None:
    """Shard the model's matmuls, assign pipeline stages and recompute, for semi_auto mode. A
    model of another backend that shards itself (MindFormers', from the same section) is left
    alone."""
    if p.mode != "semi_auto" or getattr(model, "shards_itself", False):
        return
    strategies = matmul_strategies(p)
    for name, cell in model.cells_and_names():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in strategies and hasattr(cell, "mm"):
            cell.mm.shard(strategies[leaf])
    # Pangu-alpha's top query layer is the last of model.n_layers (after the final norm): it goes
    # on the last stage, as MindFormers 0.x placed it, and the blocks fill the stages before it
    blocks = list(model.model.layers)
    top = getattr(model.model, "top_query_layer", None)
    if top is not None:
        blocks.append(top)
    for i, block in enumerate(blocks):
        if p.pipeline_stages > 1:
            block.pipeline_stage = i * p.pipeline_stages // len(blocks)
        if p.recompute:
            block.recompute()
