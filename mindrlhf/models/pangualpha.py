"""Pangu-alpha's top query layer (Zeng et al. 2021, arXiv:2104.12369), the one piece of the
architecture our GPT-style blocks do not already have.

As MindFormers 0.x built it (``mindformers/models/pangualpha/pangualpha.py``, ``QueryLayer`` and
``PanguAlphaModel``): word + learned position embeddings, ``n_layers - 1`` pre-LayerNorm blocks
(q/k/v/output projections and a fast-GELU MLP, all with biases; scores scaled by 1/sqrt(head_dim)),
the final LayerNorm, then the top query layer, a block whose attention takes its *query* from a
third embedding table indexed by position (``top_query_embedding``, not normalised) and its keys
and values from the LayerNorm of the hidden state. Its output goes to the vocabulary projection,
tied to the word embedding, with no norm after it. The layer caches its keys and values like any
block: it is the last entry of the KV cache.
"""

from __future__ import annotations

import numpy as np
from mindspore import ops

from ..config import ModelConfig
from .decoder import Block, _init


class TopQueryLayer(Block):
    """A block (``attn_norm``, ``attn``, ``mlp_norm``, ``mlp``) plus ``query_embed``
    (max_seq_len, d): the query of position ``p`` is ``q_proj(query_embed[p])``."""

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        super().__init__(cfg, rng)
        self.query_embed = _init(rng, (cfg.max_seq_len, cfg.d_model), cfg.init_std)

    def construct(self, x, bias, positions, past=None):
        query = ops.gather(self.query_embed, positions, 0)
        return Block.construct(self, x, bias, None, None, past, query)

    def decode_static(self, x, bias, positions, kt_cache, v_cache, k_idx, v_idx):
        query = ops.gather(self.query_embed, positions, 0)
        return Block.decode_static(
            self, x, bias, None, None, kt_cache, v_cache, k_idx, v_idx, query
        )
