"""RM, PPO and GRPO pieces against numbers worked out by hand."""

import math

import numpy as np
import pytest
from mindspore import Tensor

from mindrlhf.algos.grpo import group_advantages, grpo_loss, k3_kl
from mindrlhf.algos.ppo import (
    AdaptiveKLController,
    gae,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from mindrlhf.algos.rm import bradley_terry_loss, gather_last


def T(x, dt=np.float32):
    return Tensor(np.asarray(x, dtype=dt))


def test_bradley_terry_by_hand():
    loss, acc = bradley_terry_loss(T([2.0, 0.0]), T([1.0, 1.0]))
    expect = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert float(loss.asnumpy()) == pytest.approx(expect, rel=1e-5)
    assert float(acc.asnumpy()) == 0.5


def test_gather_last_right_and_left_padding():
    v = T([[1, 2, 3, 4], [5, 6, 7, 8]])
    m = T([[1, 1, 0, 0], [0, 1, 1, 1]], np.int32)
    np.testing.assert_array_equal(gather_last(v, m).asnumpy(), [2, 8])


def test_kl_penalized_rewards():
    lp = np.array([[-1.0, -2.0, -3.0]])
    ref = np.array([[-1.5, -2.0, -2.0]])
    mask = np.array([[1.0, 1.0, 0.0]])
    r, kl = kl_penalized_rewards(np.array([5.0]), lp, ref, mask, kl_coef=0.1)
    np.testing.assert_allclose(kl, [[0.5, 0.0, 0.0]])
    np.testing.assert_allclose(r, [[-0.05, 5.0, 0.0]])


def test_gae_by_hand():
    # two tokens, gamma=0.9, lam=0.8, V=[1, 2], r=[0, 1]; after the last token V=0
    # delta1 = 1 - 2 = -1 ; A1 = -1
    # delta0 = 0 + 0.9*2 - 1 = 0.8 ; A0 = 0.8 + 0.9*0.8*(-1) = 0.08
    adv, ret = gae(
        np.array([[0.0, 1.0, 0.0]]),
        np.array([[1.0, 2.0, 9.0]]),
        np.array([[1.0, 1.0, 0.0]]),
        0.9,
        0.8,
    )
    np.testing.assert_allclose(adv, [[0.08, -1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[1.08, 1.0, 0.0]], atol=1e-6)


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    r = np.array([[1.0, 2.0, 3.0]])
    v = np.array([[0.5, 0.5, 0.5]])
    adv, _ = gae(r, v, np.ones((1, 3)), 1.0, 1.0)
    np.testing.assert_allclose(adv, [[6 - 0.5, 5 - 0.5, 3 - 0.5]], atol=1e-6)


def test_whiten():
    x = np.array([[1.0, 2.0, 3.0, 100.0]])
    m = np.array([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, m)
    np.testing.assert_allclose(w[0, :3], np.array([-1, 0, 1]) / math.sqrt(2 / 3), rtol=1e-5)
    assert w[0, 3] == 0


def test_policy_loss_by_hand():
    # ratios e^0.5=1.6487 (A=+1, clipped at 1.2) and e^-0.5=0.6065 (A=-1, clipped at 0.8)
    lp, old = T([[0.0, -1.0]]), T([[-0.5, -0.5]])
    adv, mask = T([[1.0, -1.0]]), T([[1.0, 1.0]])
    loss, clipfrac, approx_kl = policy_loss(lp, old, adv, mask, 0.2)
    # token0: max(-1.6487, -1.2) = -1.2 ; token1: max(0.6065, 0.8) = 0.8
    assert float(loss.asnumpy()) == pytest.approx((-1.2 + 0.8) / 2, rel=1e-5)
    assert float(clipfrac.asnumpy()) == 1.0
    assert float(approx_kl.asnumpy()) == pytest.approx(0.0, abs=1e-6)


def test_value_loss_by_hand():
    v, old, ret, mask = T([[2.0, 0.0]]), T([[1.0, 0.0]]), T([[3.0, 1.0]]), T([[1.0, 1.0]])
    loss, frac = value_loss(v, old, ret, mask, 0.5)
    # token0: max((2-3)^2, (1.5-3)^2)=2.25 ; token1: max(1, 1)=1 -> 0.5 * 3.25 / 2
    assert float(loss.asnumpy()) == pytest.approx(0.8125, rel=1e-6)
    assert float(frac.asnumpy()) == 0.5


def test_adaptive_kl_controller():
    c = AdaptiveKLController(0.1, target=6.0, horizon=100)
    c.update(12.0, n_steps=10)  # error clipped to +0.2
    assert c.value == pytest.approx(0.1 * 1.02)
    c.update(0.0, n_steps=10)
    assert c.value == pytest.approx(0.1 * 1.02 * 0.98)


def test_group_advantages():
    a = group_advantages(np.array([1.0, 0.0, 1.0, 0.0, 3.0, 3.0]), 2)
    np.testing.assert_allclose(a, [1, -1, 1, -1, 0, 0], atol=1e-3)
    with pytest.raises(ValueError):
        group_advantages(np.ones(5), 2)


def test_grpo_loss_by_hand():
    lp, old, ref = T([[-1.0, -1.0]]), T([[-1.0, -1.0]]), T([[-1.0, -1.0 + math.log(2)]])
    adv, mask = T([2.0]), T([[1.0, 1.0]])
    loss, kl, clipfrac = grpo_loss(lp, old, ref, adv, mask, 0.2, beta=0.5)
    k = 2 - math.log(2) - 1  # k3 at d = log 2
    assert float(kl.asnumpy()) == pytest.approx(k / 2, rel=1e-5)
    assert float(loss.asnumpy()) == pytest.approx(-2.0 + 0.5 * k / 2, rel=1e-5)
    assert float(clipfrac.asnumpy()) == 0.0
    assert float(k3_kl(T([0.0]), T([0.0])).asnumpy()[0]) == 0.0


def test_trainer_applies_each_steps_learning_rate():
    """The rate Trainer sets before a step is the one the optimizer uses (warm-up included): a
    zero rate leaves the weights alone, a positive one moves them, at any step."""
    import dataclasses

    from mindspore import Parameter

    from mindrlhf.config import OptimConfig
    from mindrlhf.runtime import Dist
    from mindrlhf.stages.common import Trainer

    w = Parameter(Tensor(np.ones(3, np.float32)), name="w")
    loss = lambda x: ((w * x).sum(), w.sum())  # noqa: E731
    cfg = OptimConfig(lr=0.1, warmup_steps=0, grad_clip=0.0)
    t = Trainer([w], loss, cfg, Dist(), 10)
    x = Tensor(np.array([1.0, -2.0, 3.0], np.float32))
    t.step(x)
    before = w.asnumpy().copy()
    assert not np.allclose(before, 1.0)
    t.cfg = dataclasses.replace(cfg, lr=1e-30)  # effectively zero from now on
    t.step(x)
    np.testing.assert_allclose(w.asnumpy(), before, atol=1e-12)
    t.cfg = cfg
    t.step(x)
    assert np.abs(w.asnumpy() - before).max() > 1e-3
    # warm-up: step k of a 4-step warm-up runs at lr * (k + 1) / 4, and the optimizer sees it
    ws = Trainer([w], loss, dataclasses.replace(cfg, warmup_steps=4), Dist(), 10)
    seen = []
    for _ in range(5):
        ws.step(x)
        seen.append(float(ws.opt.learning_rate.asnumpy()))
    np.testing.assert_allclose(seen, [0.025, 0.05, 0.075, 0.1, 0.1], rtol=1e-6)
