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


def four_params(rng):
    """Two weights (one large, 2 x 40,000) and two norm gains, which AdamWeightDecay's default
    filter keeps out of weight decay: each kernel call (one per decay setting) meets more than
    one tensor, of different sizes, an odd one among them."""
    w = Parameter(Tensor(rng.standard_normal((2, 40_000)).astype(np.float32)), name="w")
    gamma = Parameter(Tensor(rng.standard_normal(7).astype(np.float32)), name="norm.gamma")
    w2 = Parameter(Tensor(rng.standard_normal((3, 5)).astype(np.float32)), name="w2")
    gamma2 = Parameter(Tensor(rng.standard_normal(1).astype(np.float32)), name="norm2.gamma")
    return [w, gamma, w2, gamma2]


@pytest.mark.parametrize("kind", ["adamweightdecay", "adamw"])
def test_fused_eager_update_is_the_optimizers_own(kind, rng):
    """optim.FusedUpdate (in-place CPU kernel calls, one over every parameter of a decay
    setting, clipping's factor folded in) against the optimizer's own step on the same gradients:
    weights, both moments and the step count, over five steps with weight decay on two
    parameters and off two others; and the gradient norm over all four."""
    from mindrlhf.optim import fused_update, make_optimizer

    ours, theirs = four_params(np.random.default_rng(3)), four_params(np.random.default_rng(3))
    opt_a = make_optimizer(kind, ours, 0.01, 0.1)
    opt_b = make_optimizer(kind, theirs, 0.01, 0.1)
    fused = fused_update(opt_a)
    assert fused is not None and opt_a.decay_flags == (True, False, True, False)
    for step in range(5):
        grads = [rng.standard_normal(p.shape).astype(np.float32) * 0.1 for p in ours]
        scale = [1.0, 0.37][step % 2]  # clipping on every other step
        fused([Tensor(g) for g in grads], scale)
        opt_b(tuple(Tensor(g * np.float32(scale)) for g in grads))
    for a, b in zip(
        [*ours, *opt_a.moments1, *opt_a.moments2], [*theirs, *opt_b.moments1, *opt_b.moments2]
    ):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=2e-6, atol=1e-7, err_msg=a.name)
    assert (
        np.abs(ours[0].asnumpy() - four_params(np.random.default_rng(3))[0].asnumpy()).max() > 0.01
    )
    assert int(opt_a.global_step.asnumpy()[0]) == int(opt_b.global_step.asnumpy()[0]) == 5
    g = [rng.standard_normal(p.shape).astype(np.float32) for p in ours]
    want = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g))
    assert fused.grad_norm([Tensor(x) for x in g]) == pytest.approx(want, rel=1e-12)


def test_eager_trainer_steps_through_the_fused_update_and_clips_alike():
    """The eager Trainer takes the fused path where it runs, and gives what its composed path
    (host norm, one multiply a gradient, the optimizer's kernel) gives, clipping every step."""
    runs = {}
    for fused in (True, False):
        model = Quadratic()
        cfg = OptimConfig(lr=0.05, weight_decay=0.1, grad_clip=0.5, compiled=False)
        t = Trainer([model.w], model.loss, cfg, Dist(), 10)
        assert t.fused is not None
        if not fused:
            t.fused = None
        norms = [t.step(Tensor(SCALE), Tensor(TARGET))[1] for _ in range(4)]
        runs[fused] = (model.w.asnumpy(), norms)
    assert min(runs[True][1]) > 0.5  # clipped at every step
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-6)
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-6, atol=1e-7)
    assert np.abs(runs[True][0] - P0).max() > 0.1
