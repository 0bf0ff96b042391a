import math

import numpy as np
from mindspore import Tensor

from mindrlhf.algos.common import entropy_from_logits, masked_mean, token_logprobs
from mindrlhf.algos.sft import sft_loss


def test_token_logprobs_by_hand():
    logits = Tensor(np.array([[[0.0, math.log(3.0)], [math.log(4.0), 0.0]]], np.float32))
    lp = token_logprobs(logits, Tensor(np.array([[1, 1]], np.int32))).asnumpy()
    np.testing.assert_allclose(lp, [[math.log(3 / 4), math.log(1 / 5)]], rtol=2e-5)


def test_sft_loss_only_counts_masked_targets():
    # vocab 2; position t's logits score token t+1
    logits = Tensor(np.array([[[0.0, 0.0], [0.0, math.log(3.0)], [9.0, 9.0]]], np.float32))
    ids = Tensor(np.array([[0, 1, 0]], np.int32))
    mask = Tensor(np.array([[0, 1, 1]], np.float32))
    # targets: token1 under uniform -> log 1/2 ; token0 under [1, 3] -> log 1/4
    expect = -(math.log(0.5) + math.log(0.25)) / 2
    np.testing.assert_allclose(float(sft_loss(logits, ids, mask).asnumpy()), expect, rtol=2e-5)
    mask2 = Tensor(np.array([[0, 0, 1]], np.float32))
    np.testing.assert_allclose(
        float(sft_loss(logits, ids, mask2).asnumpy()), -math.log(0.25), rtol=2e-5
    )


def test_masked_mean_and_entropy():
    x = Tensor(np.array([[1.0, 2.0, 100.0]], np.float32))
    m = Tensor(np.array([[1.0, 1.0, 0.0]], np.float32))
    assert float(masked_mean(x, m).asnumpy()) == 1.5
    ent = entropy_from_logits(Tensor(np.zeros((1, 1, 4), np.float32))).asnumpy()
    np.testing.assert_allclose(ent, [[math.log(4)]], rtol=2e-5)


def test_softplus_values_and_gradient_everywhere():
    """softplus = log(1 + e^x) and its gradient = sigmoid(x), at 0 too: a piecewise form
    (relu(x) + log1p(exp(-|x|))) has gradient 0 at x = 0, where DPO's first step sits (policy =
    reference, so h = 0) -- online DPO on SmolLM2 trained with a zero gradient."""
    import mindspore as ms

    from mindrlhf.algos.common import softplus

    x = np.array([-100.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 3.0, 19.9, 20.1, 50.0, 200.0], np.float32)
    v, g = ms.value_and_grad(lambda t: softplus(t).sum())(Tensor(x))
    xd = x.astype(np.float64)
    np.testing.assert_allclose(
        softplus(Tensor(x)).asnumpy(), np.logaddexp(0.0, xd), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(g.asnumpy(), 1.0 / (1.0 + np.exp(-xd)), rtol=1e-6, atol=1e-7)


def test_preference_losses_have_a_gradient_where_they_start():
    """DPO with policy = reference (h = 0): d loss / d pi_chosen = -beta * sigmoid(0) / n; the
    Bradley-Terry loss with equal rewards: d loss / d r_chosen = -1/2 / n."""
    import mindspore as ms

    from mindrlhf.algos.dpo import dpo_loss
    from mindrlhf.algos.rm import bradley_terry_loss

    ref_c, ref_r = (
        Tensor(np.array([-5.0, -7.0], np.float32)),
        Tensor(np.array([-6.0, -4.0], np.float32)),
    )
    pi_c, pi_r = Tensor(ref_c.asnumpy()), Tensor(ref_r.asnumpy())  # equal values, other tensors
    g = ms.grad(lambda c, r: dpo_loss(c, r, ref_c, ref_r, 0.1)[0], grad_position=(0, 1))(pi_c, pi_r)
    np.testing.assert_allclose(g[0].asnumpy(), [-0.025, -0.025], rtol=1e-6)
    np.testing.assert_allclose(g[1].asnumpy(), [0.025, 0.025], rtol=1e-6)
    same = np.array([0.3, -1.2], np.float32)
    gr = ms.grad(lambda c, r: bradley_terry_loss(c, r)[0], grad_position=(0, 1))(
        Tensor(same), Tensor(same.copy())
    )
    np.testing.assert_allclose(gr[0].asnumpy(), [-0.25, -0.25], rtol=1e-6)
