"""KTO, ORPO and SimPO (mindrlhf/algos/preference.py) against float64 NumPy written from the
papers' formulas; KTO's reference point carries no gradient; the config keys are checked; the
reference-free losses skip the reflogp stage; a tiny DPO stage runs with each new loss; and a
user data source of kind unpaired is read and validated like the other kinds."""

import json

import mindspore as ms
import numpy as np
import pyarrow as pa
import pytest
from mindspore import Tensor

from conftest import assert_config_rejects
from mindrlhf.algos.preference import (
    kto_loss,
    label_accuracy,
    log1mexp,
    orpo_loss,
    sequence_mean_logps,
    simpo_loss,
)


def T(x):
    return Tensor(np.asarray(x, dtype=np.float32))


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def f32(x):
    """The float32 values the losses see, in float64."""
    return np.asarray(x, np.float32).astype(np.float64)


# ---- the papers' formulas, float64 NumPy --------------------------------------------------------


def kto_reference(pi, ref, pi_kl, ref_kl, desirable, beta, wd, wu):
    """Ethayarajh et al. 2024, eq. 8: L = E[lambda_y - v(x, y)], r = log pi/ref,
    z0 = max(0, KL estimate of mismatched pairs), v = lambda_D s(beta (r - z0)) desirable,
    lambda_U s(beta (z0 - r)) undesirable."""
    z0 = max(0.0, float(np.mean(pi_kl - ref_kl)))
    r = pi - ref
    lam = np.where(desirable, wd, wu)
    v = np.where(desirable, wd * sig(beta * (r - z0)), wu * sig(beta * (z0 - r)))
    return float(np.mean(lam - v)), z0


def orpo_reference(avg_c, avg_r, lam):
    """Hong et al. 2024, eqs. 4-7: odds(y|x) = P / (1 - P), P = exp(mean token log-prob);
    L = L_SFT + lam * -log s(log(odds_w / odds_l)), L_SFT the chosen answer's mean NLL."""
    p_c, p_r = np.exp(avg_c), np.exp(avg_r)
    log_or = np.log(p_c / (1 - p_c)) - np.log(p_r / (1 - p_r))
    return float(np.mean(-avg_c - lam * np.log(sig(log_or))))


def simpo_reference(avg_c, avg_r, beta, gamma):
    """Meng et al. 2024, eq. 6: -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)."""
    return float(np.mean(-np.log(sig(beta * avg_c - beta * avg_r - gamma))))


# ---- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_shift", [3.0, -3.0])  # a KL estimate above 0, and one clamped to 0
def test_kto_matches_the_paper(kl_shift):
    rng = np.random.default_rng(1)
    n = 12
    pi, ref = f32(rng.normal(-30, 6, n)), f32(rng.normal(-30, 6, n))
    ref_kl = f32(rng.normal(-60, 8, n))
    pi_kl = f32(ref_kl + kl_shift + rng.normal(0, 1, n))
    good = rng.random(n) < 0.5
    good[:2] = [True, False]
    beta, wd, wu = 0.3, 1.0, 1.7
    expect, z0 = kto_reference(pi, ref, pi_kl, ref_kl, good, beta, wd, wu)
    assert (z0 > 0) == (kl_shift > 0)
    loss, rewards, z = kto_loss(
        T(pi), T(ref), T(pi_kl), T(ref_kl), T(good.astype(np.float32)), beta, wd, wu
    )
    assert float(loss.asnumpy()) == pytest.approx(expect, rel=1e-5)
    assert float(z.asnumpy()) == pytest.approx(z0, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(rewards.asnumpy(), beta * (pi - ref), rtol=1e-5)
    signed = np.where(good, pi - ref, ref - pi)
    acc = float(label_accuracy(rewards, T(good.astype(np.float32))).asnumpy())
    assert acc == pytest.approx(np.mean(signed > 0))


def test_kto_reference_point_carries_no_gradient():
    """d loss / d pi_kl = 0 (z0 detached: in the stage, pi and pi_kl come from the same policy,
    so a z0 left in the graph would push the policy's weights through the KL estimate, each
    pi_kl getting (d loss / d z0) / n); d loss / d pi_i is the analytic gradient with z0 a
    constant, and agrees with central finite differences of the loss with z0 held fixed."""
    rng = np.random.default_rng(2)
    n = 8
    pi, ref = rng.normal(-20, 3, n), rng.normal(-20, 3, n)
    ref_kl = rng.normal(-40, 5, n)
    pi_kl = ref_kl + 2.0 + rng.normal(0, 0.5, n)
    good = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    beta, wd, wu = 0.5, 1.3, 0.8
    g_pi, g_kl = ms.grad(
        lambda a, b: kto_loss(a, T(ref), b, T(ref_kl), T(good.astype(np.float32)), beta, wd, wu)[0],
        grad_position=(0, 1),
    )(T(pi), T(pi_kl))
    np.testing.assert_array_equal(g_kl.asnumpy(), np.zeros(n, np.float32))
    pi, ref, pi_kl, ref_kl = map(f32, (pi, ref, pi_kl, ref_kl))
    z0 = max(0.0, float(np.mean(pi_kl - ref_kl)))
    assert z0 > 0
    r = pi - ref
    # analytic: d/dr of -lam_D s(beta (r - z0)) / n and of -lam_U s(beta (z0 - r)) / n
    s_d, s_u = sig(beta * (r - z0)), sig(beta * (z0 - r))
    analytic = np.where(good, -wd * beta * s_d * (1 - s_d), wu * beta * s_u * (1 - s_u)) / n
    np.testing.assert_allclose(g_pi.asnumpy(), analytic, rtol=1e-4, atol=1e-8)

    def loss_fixed_z0(p):
        rr = p - ref
        lam = np.where(good, wd, wu)
        v = np.where(good, wd * sig(beta * (rr - z0)), wu * sig(beta * (z0 - rr)))
        return np.mean(lam - v)

    eps = 1e-4
    fd = np.array(
        [
            (loss_fixed_z0(pi + eps * np.eye(n)[i]) - loss_fixed_z0(pi - eps * np.eye(n)[i]))
            / (2 * eps)
            for i in range(n)
        ]
    )
    np.testing.assert_allclose(g_pi.asnumpy(), fd, rtol=1e-3, atol=1e-8)


def test_orpo_matches_the_paper_and_log1mexp_is_stable():
    rng = np.random.default_rng(3)
    avg_c, avg_r = f32(-rng.uniform(0.05, 6.0, 10)), f32(-rng.uniform(0.05, 6.0, 10))
    avg_c[0], avg_r[1] = f32(-0.69), f32(-0.7)  # both sides of log1mexp's switch at -log 2
    loss, oc, orj = orpo_loss(T(avg_c), T(avg_r), 0.25)
    assert float(loss.asnumpy()) == pytest.approx(orpo_reference(avg_c, avg_r, 0.25), rel=1e-5)
    np.testing.assert_allclose(
        oc.asnumpy(), np.log(np.exp(avg_c) / (1 - np.exp(avg_c))), rtol=1e-5, atol=1e-6
    )
    # log(1 - e^x) to float32 accuracy from x = -1e-6 (1 - e^x underflows naively) to -80
    x = np.array([-1e-6, -1e-3, -0.5, -0.6931, -0.7, -2.0, -30.0, -80.0])
    got = log1mexp(T(x)).asnumpy()
    np.testing.assert_allclose(got, np.log(-np.expm1(f32(x))), rtol=2e-6, atol=1e-7)
    g = ms.grad(lambda t: orpo_loss(t, T(avg_r[:3]), 0.1)[0])(T([-1e-7, -0.69, -9.0])).asnumpy()
    assert np.isfinite(g).all()


def test_simpo_matches_the_paper():
    rng = np.random.default_rng(4)
    avg_c, avg_r = f32(rng.normal(-2.0, 0.7, 10)), f32(rng.normal(-2.3, 0.7, 10))
    loss, rc, rr = simpo_loss(T(avg_c), T(avg_r), 2.5, 0.8)
    assert float(loss.asnumpy()) == pytest.approx(simpo_reference(avg_c, avg_r, 2.5, 0.8), rel=1e-5)
    np.testing.assert_allclose(rc.asnumpy(), 2.5 * avg_c, rtol=1e-6)


def test_sequence_mean_logps_is_the_per_token_mean_over_the_response():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (2, 6, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 6)).astype(np.int32)
    resp = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], np.float32)
    got = sequence_mean_logps(T(logits), Tensor(ids), T(resp)).asnumpy()
    lp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=1))
    for b in range(2):
        toks = [lp[b, t - 1, ids[b, t]] for t in range(1, 6) if resp[b, t]]
        assert got[b] == pytest.approx(np.mean(toks), rel=1e-5)


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key",
    [
        ("dpo:\n  loss: dpop\n", "dpo.loss"),
        ("dpo:\n  loss: kto\n  desirable_weight: -1.0\n", "dpo.desirable_weight must be > 0"),
        ("dpo:\n  loss: kto\n  undesirable_weight: -0.5\n", "dpo.undesirable_weight must be > 0"),
        ("dpo:\n  orpo_lambda: -0.1\n", "dpo.orpo_lambda must be >= 0"),
        ("dpo:\n  simpo_gamma: -1\n", "dpo.simpo_gamma must be >= 0"),
        ("dpo:\n  loss: simpo\n  label_smoothing: 0.1\n", "dpo.label_smoothing applies to"),
    ],
)
def test_dpo_config_rejects_bad_values_naming_the_key(tmp_path, text, key):
    assert_config_rejects(tmp_path, text, key)


def test_defaults_keep_sigmoid_and_the_dpo_key_follows_the_loss():
    from mindrlhf.config import load_config
    from mindrlhf.keys import stage_key

    cfg = load_config("demo")
    assert cfg.dpo.loss == "sigmoid" and not cfg.dpo.reference_free
    keys = {
        loss: stage_key("dpo", load_config("demo", {"dpo": {"loss": loss}}).to_dict(), {})
        for loss in ("sigmoid", "ipo", "kto", "orpo", "simpo")
    }
    assert len(set(keys.values())) == 5
    ref_key = stage_key("reflogp", load_config("demo", {"dpo": {"loss": "orpo"}}).to_dict(), {})
    assert ref_key == stage_key("reflogp", cfg.to_dict(), {})  # beta, loss: not the reference's


# ---- the flow's DPO branch --------------------------------------------------------------------


def test_reference_free_losses_skip_reflogp_and_kto_asks_for_its_layout():
    from flows.pipeline import dpo_plan
    from mindrlhf.config import load_config

    d = {
        "pairs_train": "P1",
        "pairs_heldout": "P2",
        "unpaired_train": "U1",
        "unpaired_heldout": "U2",
    }

    def plan(loss):
        return dpo_plan(load_config("demo", {"dpo": {"loss": loss}}).to_dict(), d, "S")

    for loss in ("orpo", "simpo"):
        ref, dpo = plan(loss)
        assert ref is None and dpo == {"train": "P1", "heldout": "P2", "sft": "S"}
    for loss in ("sigmoid", "ipo"):  # exactly today's inputs: today's cache keys
        ref, dpo = plan(loss)
        assert ref == {"train": "P1", "heldout": "P2", "model": "S"}
        assert dpo == {"train": "P1", "heldout": "P2", "sft": "S"}
    ref, dpo = plan("kto")
    assert ref == {**{k: v for k, v in dpo.items() if k != "sft"}, "model": "S", "examples": "kto"}
    assert dpo == {
        "train": "P1",
        "heldout": "P2",
        "unpaired_train": "U1",
        "unpaired_heldout": "U2",
        "sft": "S",
    }
    kto_only = dpo_plan(
        load_config("demo", {"dpo": {"loss": "kto"}}).to_dict(),
        {"unpaired_train": "U1", "unpaired_heldout": "U2"},
        "S",
    )
    assert kto_only[0]["examples"] == "kto" and "train" not in kto_only[1]
    with pytest.raises(ValueError, match="dpo.loss simpo needs preference pairs"):
        dpo_plan(load_config("demo", {"dpo": {"loss": "simpo"}}).to_dict(), {}, "S")


def test_flow_runs_no_reference_stage_for_simpo(monkeypatch):
    """run_dpo_branch with the stage tasks replaced by recorders: which stages it launches."""
    import flows.pipeline as fp
    from mindrlhf.config import load_config

    launched = []

    def fake_call(task, stage, c, inputs, run, label=None):
        launched.append((stage, dict(inputs)))
        out = {"train": "R1", "heldout": "R2"} if stage == "reflogp" else {"checkpoint": "C"}
        return {"outputs": out, "metrics": {"m": 1.0}}

    monkeypatch.setattr(fp, "call", fake_call)
    d = {"pairs_train": "P1", "pairs_heldout": "P2"}
    for loss, stages in (("simpo", ["dpo"]), ("orpo", ["dpo"]), ("kto", ["reflogp", "dpo"])):
        launched.clear()
        c = load_config("demo", {"dpo": {"loss": loss}}).to_dict()
        assert fp.run_dpo_branch(c, d, "S", {})["checkpoint"] == "C"
        assert [s for s, _ in launched] == stages
        assert ("ref_train" in launched[-1][1]) == (loss == "kto")


# ---- KTO's examples and their mismatched pairs -------------------------------------------------


def test_kto_examples_and_kl_partners():
    from mindrlhf.data.tokenize import IDS
    from mindrlhf.data.unpaired import kl_partners, kto_examples, with_kl_sequences

    pairs = pa.table(
        {
            "chosen_ids": pa.array([[1, 2, 10, 11], [3, 20]], IDS),
            "rejected_ids": pa.array([[1, 2, 12], [3, 21, 22, 23]], IDS),
            "prompt_len": pa.array([2, 1], pa.int32()),
        }
    )
    unpaired = pa.table(
        {
            "completion_ids": pa.array([[4, 5, 6, 30]], IDS),
            "prompt_len": pa.array([3], pa.int32()),
            "desirable": pa.array([0], pa.int8()),
        }
    )
    ex = kto_examples(pairs, unpaired)
    assert ex.column("desirable").to_pylist() == [1, 1, 0, 0, 0]
    assert ex.column("pair").to_pylist() == [0, 1, 0, 1, -1]
    for n in (2, 5, 31):
        p = kl_partners(n, seed=n)
        assert sorted(p) == list(range(n)) and (p != np.arange(n)).all()
    partner = np.array([4, 0, 1, 2, 3])
    kl = with_kl_sequences(ex, partner).column("kl_ids").to_pylist()
    assert kl[0] == [1, 2, 30] and kl[1] == [3, 10, 11]
    assert kl[4] == [4, 5, 6, 21]  # cut at the longest example's 4 tokens


def test_unpaired_source_is_read_and_each_error_names_file_row_and_field(tmp_path):
    from mindrlhf.config import DataSource
    from mindrlhf.data.schema import DataError
    from mindrlhf.data.sources import build_source

    rows = [
        {"q": f"question {i}", "completion": f"answer {i}", "label": i % 3 != 0} for i in range(30)
    ]
    good = tmp_path / "kto.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = DataSource(kind="unpaired", path=str(good), fields={"prompt": "q"})
    out = build_source(spec, 0, 0.2)
    both = pa.concat_tables([out["unpaired_train"], out["unpaired_heldout"]])
    assert both.num_rows == 30 and set(both.column("label").to_pylist()) == {True, False}
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "kto.parquet")
    spec_pq = DataSource(
        kind="unpaired", path=str(tmp_path / "kto.parquet"), fields={"prompt": "q"}
    )
    assert (
        build_source(spec_pq, 0, 0.2)["unpaired_train"].num_rows == out["unpaired_train"].num_rows
    )

    for i, (field, value, msg) in enumerate(
        [
            ("label", 1, "field 'label': 1 is a number where line 1 has a bool"),
            ("label", "yes", "field 'label': 'yes' is a str where line 1 has a bool"),
            ("label", None, "field 'label': is null"),
            ("completion", "  ", "field 'completion': is empty"),
        ]
    ):
        bad_rows = [dict(r) for r in rows]
        bad_rows[4][field] = value
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text("\n".join(json.dumps(r) for r in bad_rows) + "\n")
        with pytest.raises(DataError) as e:
            build_source(DataSource(kind="unpaired", path=str(bad), fields={"prompt": "q"}), 0, 0.2)
        assert f"{bad}: line 5: {msg}" in str(e.value)
    ints = tmp_path / "ints.jsonl"  # 0 / 1 throughout: a column of numbers, not booleans
    ints.write_text("\n".join(json.dumps({**r, "label": int(r["label"])}) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"ints.jsonl: line 1: field 'label': must be a boolean"):
        build_source(DataSource(kind="unpaired", path=str(ints), fields={"prompt": "q"}), 0, 0.2)
    del rows[2]["label"]
    miss = tmp_path / "missing.jsonl"
    miss.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"missing.jsonl: line 3: field 'label': is null"):
        build_source(DataSource(kind="unpaired", path=str(miss), fields={"prompt": "q"}), 0, 0.2)
    miss.write_text("\n".join(json.dumps({"q": r["q"], "completion": "x"}) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"missing.jsonl: line 1: field 'label': missing"):
        build_source(DataSource(kind="unpaired", path=str(miss), fields={"prompt": "q"}), 0, 0.2)


# ---- a tiny DPO stage with each new loss ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kto", "orpo", "simpo"])
def test_tiny_dpo_stage_runs_with_each_new_loss(tiny_chain, loss):
    from conftest import tiny_full_overrides
    from flows.pipeline import dpo_plan
    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage

    root = tiny_chain.root
    over = tiny_full_overrides(root)
    over["dpo"].update(loss=loss, **({"beta": 2.0} if loss == "simpo" else {}))
    cfg = load_config("demo", over)
    quiet = dict(log=lambda s: None)
    store = ArtifactStore(root)
    data = dict(tiny_chain.data)
    if loss == "kto":  # and a few unpaired examples beside the pairs (a kind: unpaired source)
        from mindrlhf.data.tokenize import tokenize_unpaired
        from mindrlhf.data.tokenizer import load_tokenizer

        for split, n in (("train", 12), ("heldout", 4)):
            text = pa.table(
                {
                    "prompt": ["Review:"] * n,
                    "completion": [f"a film of {i} scenes" for i in range(n)],
                    "label": [i % 3 == 0 for i in range(n)],
                }
            )
            table = tokenize_unpaired(text, load_tokenizer(cfg.tokenizer), 12, 32)
            data[f"unpaired_{split}"] = store.write_dataset(table, name=f"unp-{split}").id
    ref_inputs, inputs = dpo_plan(cfg.to_dict(), data, tiny_chain.sft)
    assert (ref_inputs is None) == (loss != "kto")
    if ref_inputs is not None:
        ref = run_stage("reflogp", cfg, ref_inputs, root, root / "runs" / f"ref-{loss}", **quiet)
        inputs.update(ref_train=ref["outputs"]["train"], ref_heldout=ref["outputs"]["heldout"])
        n_pairs = store.get(tiny_chain.data["pairs_train"]).manifest["num_rows"]
        kto_ref = store.read_dataset(ref["outputs"]["train"])
        assert kto_ref.num_rows == 2 * n_pairs + 12
        assert sorted(kto_ref.column("kl_partner").to_pylist()) == list(range(2 * n_pairs + 12))
        # the chosen / rejected sides score as the pair reference does (same model, same rows)
        pair_ref = store.read_dataset(tiny_chain.ref["train"])
        np.testing.assert_allclose(
            kto_ref.column("ref_logp").to_numpy()[: 2 * n_pairs],
            np.concatenate(
                [pair_ref.column(c).to_numpy() for c in ("ref_chosen_logp", "ref_rejected_logp")]
            ),
            rtol=1e-5,
        )
    res = run_stage("dpo", cfg, inputs, root, root / "runs" / f"dpo-{loss}", **quiet)
    m = res["metrics"]
    assert m["loss"] == loss and len(res["history"]) == 2
    assert 0.0 <= m["heldout_reward_accuracy_dpo"] <= 1.0
    assert all(np.isfinite(v) for k, v in m.items() if k.startswith("heldout_"))
    if loss == "kto":
        assert {"heldout_label_accuracy_dpo", "heldout_kl_dpo"} <= set(m)
        assert m["heldout_reward_accuracy_sft"] == 0.5  # policy = reference: every reward 0
    else:
        assert np.isfinite(m["heldout_loss_dpo"]) and "heldout_reward_margin_sft" in m
