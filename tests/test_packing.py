"""SFT sequence packing (mindrlhf/data/packing.py, ``sft.packing``): several examples in one row
must each score exactly as they do alone -- no attention across examples, positions restarting
per example -- in both decoder families, eager and compiled."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import randomize, tiny_model_cfg

LENGTHS = [11, 5, 17, 9, 3, 14, 8]


def sft_table(rng, lengths=LENGTHS, vocab=97):
    ids = [rng.integers(1, vocab, n).tolist() for n in lengths]
    # a prompt of 1-3 tokens (loss 0), then the response (loss 1)
    masks = [[0] * (1 + i % 3) + [1] * (n - 1 - i % 3) for i, n in enumerate(lengths)]
    return pa.table(
        {
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "loss_mask": pa.array(masks, pa.list_(pa.int8())),
            "prompt_len": pa.array([1 + i % 3 for i in range(len(lengths))], pa.int32()),
        }
    )


def test_pack_groups_fill_rows_and_keep_every_example_once():
    from mindrlhf.data.packing import pack_groups

    packs = pack_groups(LENGTHS, 24)
    assert sorted(i for p in packs for i in p) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in p) <= 24 for p in packs)
    assert len(packs) == 3  # 67 tokens: three rows of 24 is the fewest
    assert pack_groups(LENGTHS, 24) == packs  # the lengths alone decide
    with pytest.raises(ValueError, match="row 2 has 17 tokens"):
        pack_groups(LENGTHS, 16)


def test_packed_table_concatenates_examples_and_clears_each_first_target(rng):
    from mindrlhf.data.packing import pack_sft_table

    t = sft_table(rng)
    packed = pack_sft_table(t, 24)
    ids, lm = t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist()
    for row in packed.to_pylist():
        pos = 0
        for s, i in enumerate(row["examples"], 1):
            n = len(ids[i])
            assert row["input_ids"][pos : pos + n] == ids[i]
            assert row["segment_ids"][pos : pos + n] == [s] * n
            assert row["loss_mask"][pos] == 0 and row["loss_mask"][pos + 1 : pos + n] == lm[i][1:]
            pos += n
        assert pos == len(row["input_ids"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "pangualpha"])
@pytest.mark.parametrize("compiled", [False, True])
def test_each_packed_example_scores_as_it_does_alone(rng, family, compiled):
    """Per-token log-probs and each example's SFT loss from one packed forward equal those of
    the example run by itself. A trained-like random model (sharp attention, non-unit norms):
    at init a tiny model's near-uniform attention would hide a leak across examples."""
    import mindspore as ms
    from mindspore import Tensor

    from mindrlhf.algos.common import shifted_logprobs
    from mindrlhf.algos.sft import sft_loss
    from mindrlhf.data.packing import pack_sft_table, packed_batch
    from mindrlhf.models.decoder import CausalLM

    model = CausalLM(tiny_model_cfg(family), seed=3)
    randomize(model, seed=4, qk_scale=3.0)
    model.set_train(False)
    t = sft_table(rng)
    packed = pack_sft_table(t, 40)
    bt = packed_batch(packed, np.arange(packed.num_rows), pad_id=0, multiple=8)
    assert bt["input_ids"].shape[1] == 40  # one bucket: rows padded

    def packed_fwd(ids, seg):
        return shifted_logprobs(model(ids, seg, segments=seg)[0], ids)

    def plain_fwd(ids, am):
        return shifted_logprobs(model(ids, am)[0], ids)

    if compiled:
        packed_fwd, plain_fwd = ms.jit(packed_fwd), ms.jit(plain_fwd)
    lp = packed_fwd(Tensor(bt["input_ids"]), Tensor(bt["segment_ids"])).asnumpy()
    ids, lm = t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist()
    checked = 0
    for r, row in enumerate(packed.to_pylist()):
        pos = 0
        for i in row["examples"]:
            n = len(ids[i])
            x = np.array([ids[i]], np.int32)
            alone = plain_fwd(Tensor(x), Tensor(np.ones_like(x))).asnumpy()[0]
            # targets inside the example: packed positions pos+1 .. pos+n-1
            np.testing.assert_allclose(lp[r, pos : pos + n - 1], alone, rtol=1e-5, atol=1e-5)
            # its SFT loss, read off the packed row through its own loss-mask span
            mask = np.zeros((1, bt["input_ids"].shape[1]), np.float32)
            mask[0, pos + 1 : pos + n] = np.array(lm[i][1:], np.float32)
            packed_loss = -(lp[r : r + 1] * mask[:, 1:]).sum() / mask.sum()
            logits_alone = model(Tensor(x), Tensor(np.ones_like(x)))[0]
            loss_alone = float(
                sft_loss(logits_alone, Tensor(x), Tensor(np.array([lm[i]], np.float32))).asnumpy()
            )
            assert packed_loss == pytest.approx(loss_alone, rel=1e-5)
            pos += n
            checked += 1
    assert checked == len(LENGTHS)


def test_unpacked_rows_score_as_before(rng):
    """Rows without segments take the old path: a padded batch equals each row alone."""
    from mindspore import Tensor

    from mindrlhf.models.decoder import CausalLM

    model = CausalLM(tiny_model_cfg("llama"), seed=1)
    randomize(model, seed=2, qk_scale=3.0)
    x = rng.integers(1, 97, (2, 12)).astype(np.int32)
    am = np.ones_like(x)
    am[1, 7:] = 0
    full = model(Tensor(x), Tensor(am))[0].asnumpy()
    alone = model(Tensor(x[1:, :7]), Tensor(am[1:, :7]))[0].asnumpy()
    np.testing.assert_allclose(full[1, :7], alone[0], rtol=1e-5, atol=1e-5)
