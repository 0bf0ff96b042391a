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
    np.testing.assert_allclose(float(sft_loss(logits, ids, mask2).asnumpy()), -math.log(0.25), rtol=2e-5)


def test_masked_mean_and_entropy():
    x = Tensor(np.array([[1.0, 2.0, 100.0]], np.float32))
    m = Tensor(np.array([[1.0, 1.0, 0.0]], np.float32))
    assert float(masked_mean(x, m).asnumpy()) == 1.5
    ent = entropy_from_logits(Tensor(np.zeros((1, 1, 4), np.float32))).asnumpy()
    np.testing.assert_allclose(ent, [[math.log(4)]], rtol=2e-5)
