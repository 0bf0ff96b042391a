"""``<stage>.optimizer``: ``adamw`` is torch.optim.AdamW's update (bias-corrected, decoupled
weight decay), checked against the formula written out in NumPy, through the Trainer compiled and
eager, across a resume; ``adamweightdecay`` (the default) stays MindSpore's uncorrected one."""

import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

from mindrlhf.config import OptimConfig
from mindrlhf.runtime import Dist
from mindrlhf.stages.common import Trainer

P0 = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
TARGET = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
SCALE = np.random.default_rng(2).uniform(0.1, 3.0, (3, 5)).astype(np.float32)
SCALE[0, :2] = 1e-8  # gradients the size of eps: where eps and its bias correction show


class Quadratic(nn.Cell):
    """loss = sum(scale * (w - target)^2): gradient 2 scale (w - target), known in closed form."""

    def __init__(self):
        super().__init__()
        self.w = Parameter(Tensor(P0.copy()), name="w")

    def loss(self, scale, target):
        d = self.w - target
        loss = (scale * d * d).sum()
        return loss, loss


def numpy_adamw(steps, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Loshchilov & Hutter's AdamW as torch.optim.AdamW writes it, in float64."""
    w = P0.astype(np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, steps + 1):
        g = 2 * SCALE * (w - TARGET)
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return w


def trainer(compiled: bool, optimizer: str, lr=0.05, wd=0.1):
    model = Quadratic()
    cfg = OptimConfig(lr=lr, weight_decay=wd, grad_clip=0.0, compiled=compiled, optimizer=optimizer)
    return model, Trainer([model.w], model.loss, cfg, Dist(), 10)


def run(t, n):
    for _ in range(n):
        t.step(Tensor(SCALE), Tensor(TARGET))


@pytest.mark.parametrize("compiled", [True, False])
def test_adamw_is_torchs_update_and_resumes(compiled):
    model, t = trainer(compiled, "adamw")
    run(t, 3)
    saved_w = model.w.asnumpy().copy()
    saved_opt = {k: v.copy() for k, v in t.optimizer_state().items()}  # as written to disk
    run(t, 3)
    want = numpy_adamw(6, 0.05, 0.1)
    assert np.abs(model.w.asnumpy() - want).max() < 2e-6
    assert np.abs(want - P0).max() > 0.2  # it moved: the comparison means something

    # a resumed run: weights and optimizer state (moments and the step count the bias
    # correction reads) from the checkpoint, three more steps
    model2, t2 = trainer(compiled, "adamw")
    model2.w.set_data(Tensor(saved_w))
    t2.load_optimizer_state(saved_opt)
    run(t2, 3)
    assert np.abs(model2.w.asnumpy() - model.w.asnumpy()).max() < 1e-6


def test_default_is_still_mindspores_uncorrected_update():
    """One step at lr 0.05, no decay: AdamW moves each weight by lr |g| / (|g| + 1e-8) (its
    bias-corrected m / sqrt(v) is g / |g|), AdamWeightDecay by lr 0.1 |g| / (sqrt(0.001) |g| +
    1e-6): about 3.16 lr."""
    assert OptimConfig().optimizer == "adamweightdecay"
    moved = {}
    for kind in ("adamw", "adamweightdecay"):
        model, t = trainer(True, kind, wd=0.0)
        run(t, 1)
        moved[kind] = np.abs(model.w.asnumpy() - P0)
    g = np.abs(2 * SCALE * (P0 - TARGET)).astype(np.float64)
    np.testing.assert_allclose(moved["adamw"], 0.05 * g / (g + 1e-8), rtol=1e-5, atol=1e-7)
    want = 0.05 * 0.1 * g / (0.001**0.5 * g + 1e-6)
    np.testing.assert_allclose(moved["adamweightdecay"], want, rtol=1e-5, atol=1e-7)


def test_unknown_optimizer_is_refused_naming_the_key():
    from mindrlhf.config import ConfigError, load_config

    with pytest.raises((ConfigError, ValueError), match=r"sft\.optimizer"):
        load_config("demo", {"sft": {"optimizer": "sgd"}})
