"""Compiled graphs do not accumulate memory: a compiled training step at SmolLM2's widths (d=576,
49k vocabulary, GQA 9/3 heads; 2 layers to keep it short) fed batches of several lengths keeps
the process's resident memory within about one graph of where it was after the first, because the
graph pool releases the least recently used graphs once the live ones exceed their budget
(graphs.py). Without that, each new length kept ~1.5 GB here (~7 GB at 30 layers, which is how
the smollm2-135m profile was killed by the OOM killer). Released graphs compile again to the
same numbers: the losses equal the eager step's."""

import numpy as np
import pytest
from mindspore import Tensor

from mindrlhf.algos.sft import sft_loss
from mindrlhf.config import ModelConfig, OptimConfig
from mindrlhf.graphs import POOL, rss_bytes
from mindrlhf.models.decoder import CausalLM
from mindrlhf.runtime import Dist
from mindrlhf.stages.common import Trainer

pytestmark = pytest.mark.slow  # launches stage processes, servers or large models

SMOL = dict(
    family="llama",
    vocab_size=49152,
    d_model=576,
    n_layers=2,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    max_seq_len=512,
    norm_eps=1e-5,
    rope_theta=100000.0,
)


@pytest.fixture
def pool():
    POOL.release_all()
    saved = POOL.max_graphs, POOL.ceiling
    yield POOL
    POOL.release_all()
    POOL.configure(*saved)


def trainer(compiled: bool):
    m = CausalLM(ModelConfig(**SMOL), seed=0)
    m.set_train(True)

    def loss_fn(ids, am, lm, denom):
        logits, _ = m(ids, am)
        loss = sft_loss(logits, ids, lm, denom)
        return loss, loss

    return Trainer(
        m.trainable_params(), loss_fn, OptimConfig(lr=1e-4, compiled=compiled), Dist(), 100
    )


def batch(rng, length):
    ids = rng.integers(0, 49152, (2, length)).astype(np.int32)
    am = np.ones((2, length), np.int32)
    return Tensor(ids), Tensor(am), Tensor(am.astype(np.float32)), Tensor(np.float32(2 * length))


def test_graph_pool_bounds_resident_memory_over_many_lengths(pool):
    lengths = [64, 96, 144, 216, 64]
    data = [batch(np.random.default_rng(i), n) for i, n in enumerate(lengths)]
    jit = trainer(True)
    pool.configure(16, None)
    losses = [jit.step(*data[0])[0]]
    one = rss_bytes()
    losses.append(jit.step(*data[1])[0])
    two = rss_bytes()
    cost = two - one  # what one more SmolLM2-width training graph keeps resident
    assert cost > 300 * 2**20, (
        f"a SmolLM2-width training graph should keep hundreds of MB, measured {cost}"
    )
    pool.configure(16, two + cost // 2)  # room for the graphs already live, not for one more
    peaks = []
    for bt in data[2:]:
        losses.append(jit.step(*bt)[0])
        peaks.append(rss_bytes())
    assert pool.released >= 3
    growth = max(peaks) - two
    assert growth < 0.8 * cost, (
        f"resident memory grew {growth / 2**30:.2f} GB over {len(lengths) - 2} more "
        f"lengths; one graph keeps {cost / 2**30:.2f} GB"
    )

    eager = trainer(False)
    np.testing.assert_allclose(losses, [eager.step(*bt)[0] for bt in data], rtol=2e-5)
