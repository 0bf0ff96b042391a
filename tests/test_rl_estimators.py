"""The online RL variants of the GRPO stage (grpo.estimator, grpo.loss_agg, clip-higher, dynamic
sampling, overlong penalty) against values worked out independently in float64 NumPy straight
from each paper's formula, on random inputs with unequal response lengths; a gradient check of
REINFORCE++ (its KL is in the reward: no KL gradient reaches the policy); config validation; and
tiny GRPO stage runs of a non-default combination (finite metrics, counts reported, resumable)."""

import signal

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import assert_config_rejects
from mindrlhf.algos.dapo import informative_groups, overlong_penalty, token_mean
from mindrlhf.algos.dr_grpo import centred_group_advantages
from mindrlhf.algos.estimators import ESTIMATORS, policy_loss
from mindrlhf.algos.grpo import grpo_loss
from mindrlhf.algos.reinforce_pp import reinforce_pp_advantages
from mindrlhf.algos.rloo import rloo_advantages
from mindrlhf.config import GRPOConfig, load_config
from mindrlhf.models.generation import Generation
from mindrlhf.stages.dynamic_sampling import fill_batch, merge_generations, more_prompts

LENGTHS = [7, 1, 4, 6, 2, 5, 3, 7]  # unequal response lengths, one of a single token
K = 4  # group size: 8 rows = 2 groups


def T(x):
    return Tensor(np.asarray(x, np.float32))


def response_mask(lengths, width):
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.float64)


@pytest.fixture
def batch():
    """Log-probs of a rollout (old), the reference and the current policy, on masked rows;
    ratios spread over and around both clip bounds (some in (1.2, 1.28): clip-higher's band)."""
    r = np.random.default_rng(7)
    b, t = len(LENGTHS), max(LENGTHS)
    mask = response_mask(LENGTHS, t)
    old = -r.uniform(0.1, 3.0, (b, t))
    ref = old + r.normal(0.0, 0.4, (b, t))
    log_ratio = r.normal(0.0, 0.25, (b, t))
    log_ratio[0, :3] = np.log([1.24, 1.26, 0.7])  # between the symmetric and the higher bound
    log_ratio[3, :2] = np.log([1.25, 0.75])
    lp = old + log_ratio
    rewards = r.choice([0.0, 0.3, 1.0], b) + r.normal(0.0, 0.05, b)
    junk = r.normal(0.0, 2.0, (b, t)) * (1 - mask)  # off-mask values must not count
    return dict(
        lp=lp + junk,
        old=old,
        ref=ref,
        mask=mask,
        rewards=rewards,
        adv_seq=r.normal(0.0, 1.0, b),
        adv_tok=r.normal(0.0, 1.0, (b, t)),
    )


# ---- advantages -------------------------------------------------------------------------------


def test_rloo_is_reward_minus_mean_of_the_other_samples(batch):
    r = batch["rewards"]
    want = np.empty_like(r)
    for i in range(len(r)):
        g = i // K
        others = [r[j] for j in range(g * K, (g + 1) * K) if j != i]
        want[i] = r[i] - sum(others) / (K - 1)
    np.testing.assert_allclose(rloo_advantages(r, K), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        rloo_advantages(np.ones(6), K)


def test_dr_grpo_advantages_are_not_divided_by_the_group_std(batch):
    r = batch["rewards"]
    want = np.array([r[i] - np.mean(r[i // K * K : i // K * K + K]) for i in range(len(r))])
    np.testing.assert_allclose(centred_group_advantages(r, K), want, rtol=1e-5, atol=1e-6)


def test_grpo_estimator_divides_by_the_std_unless_dr_grpo_says_not(batch):
    r, m = batch["rewards"], batch["mask"]
    g = r.reshape(-1, K)
    centred = (g - g.mean(1, keepdims=True)).reshape(-1)
    scaled = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-4)).reshape(-1)

    def est(**kw):
        gc = GRPOConfig(group_size=K, **kw)
        return ESTIMATORS[gc.estimator](gc, r, batch["old"], batch["ref"], m)

    np.testing.assert_allclose(est(), scaled, rtol=1e-5)  # today's default
    np.testing.assert_allclose(est(loss_agg="dr_grpo"), centred, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est(std_normalize=False), centred, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est(loss_agg="dr_grpo", std_normalize=True), scaled, rtol=1e-5)


def test_reinforce_pp_advantages_from_the_formula(batch):
    """r_t = -beta (log pi_old - log pi_ref) per token, + R on the last; G_t = sum_{s>=t} r_s;
    A = (G - mean) / std over every response token of the batch (not per group)."""
    beta, m = 0.3, batch["mask"]
    lp, ref, R = batch["old"], batch["ref"], batch["rewards"]
    b, t = m.shape
    G = np.zeros((b, t))
    for i, n in enumerate(LENGTHS):
        rew = [-beta * (lp[i, s] - ref[i, s]) + (R[i] if s == n - 1 else 0.0) for s in range(n)]
        for s in range(n):
            G[i, s] = sum(rew[s:])
    vals = np.array([G[i, s] for i, n in enumerate(LENGTHS) for s in range(n)])
    want = (G - vals.mean()) / np.sqrt(vals.var() + 1e-8) * m
    got = reinforce_pp_advantages(R, lp, ref, m, beta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    gc = GRPOConfig(group_size=K, estimator="reinforce_pp", beta=beta)
    np.testing.assert_array_equal(ESTIMATORS["reinforce_pp"](gc, R, lp, ref, m), got)


# ---- the loss: aggregations and clip-higher -----------------------------------------------------


def reference_loss(d, adv, agg, low, high, beta, max_len):
    """The clipped surrogate plus beta * k3, aggregated as GRPO / Dr. GRPO / DAPO define it."""
    m = d["mask"]
    A = adv[:, None] if adv.ndim == 1 else adv
    ratio = np.exp(d["lp"] - d["old"])
    surrogate = np.minimum(ratio * A, np.clip(ratio, 1 - low, 1 + high) * A)
    diff = d["ref"] - d["lp"]
    x = (-surrogate + beta * (np.exp(diff) - diff - 1)) * m
    lengths = m.sum(1)
    if agg == "grpo":
        return np.mean([x[i].sum() / lengths[i] for i in range(len(x))])
    if agg == "dr_grpo":
        return np.mean([x[i].sum() / max_len for i in range(len(x))])
    return x.sum() / m.sum()  # dapo: every token of the batch weighs the same


def run_loss(gc, d, adv, denom=None, jit=False):
    fn = policy_loss(gc)
    args = [T(d[k]) for k in ("lp", "old", "ref")] + [T(adv), T(d["mask"])]
    args.append(T(d["mask"].sum() if denom is None else denom))
    return [float(v.asnumpy()) for v in (ms.jit(fn) if jit else fn)(*args)]


@pytest.mark.parametrize("agg", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("per_token", [False, True])
def test_loss_aggregations_and_clip_higher_from_the_formula(batch, agg, per_token):
    adv = batch["adv_tok"] if per_token else batch["adv_seq"]
    gc = GRPOConfig(loss_agg=agg, clip_low=0.2, clip_high=0.28, beta=0.05, max_new_tokens=9)
    want = reference_loss(batch, adv, agg, 0.2, 0.28, 0.05, 9)
    loss, kl, clipfrac = run_loss(gc, batch, adv)
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-7)
    symmetric = reference_loss(batch, adv, agg, 0.2, 0.2, 0.05, 9)
    assert abs(symmetric - want) > 1e-4  # the inputs tell clip-higher from the symmetric clip
    gc_sym = GRPOConfig(loss_agg=agg, clip_range=0.2, beta=0.05, max_new_tokens=9)
    assert run_loss(gc_sym, batch, adv)[0] == pytest.approx(symmetric, rel=1e-5, abs=1e-7)
    # the compiled step (Trainer compiles the loss): the same numbers
    np.testing.assert_allclose(run_loss(gc, batch, adv, jit=True), [loss, kl, clipfrac], 1e-5)


def test_defaults_are_todays_grpo_loss_bit_for_bit(batch):
    d, adv = batch, batch["adv_seq"]
    gc = GRPOConfig()
    assert gc.clip_bounds == (gc.clip_range, gc.clip_range) and gc.scales_by_std
    args = [T(d[k]) for k in ("lp", "old", "ref")] + [T(adv), T(d["mask"])]
    today = [v.asnumpy() for v in grpo_loss(*args, gc.clip_range, gc.beta)]
    now = [v.asnumpy() for v in policy_loss(gc)(*args, T(1.0))]
    for a, b in zip(today, now):
        np.testing.assert_array_equal(a, b)


def test_dapo_token_mean_over_data_parallel_ranks_is_the_batchs(batch):
    """Two ranks with half the rows each, denom = all tokens / 2: the mean of their losses (the
    gradient all-reduce's mean) is the whole mini-batch's token mean."""
    x, m = batch["adv_tok"], batch["mask"]
    denom = m.sum() / 2
    halves = [
        float(token_mean(T(x[s]), T(m[s]), T(denom)).asnumpy()) for s in (slice(0, 4), slice(4, 8))
    ]
    assert np.mean(halves) == pytest.approx((x * m).sum() / m.sum(), rel=1e-5)


# ---- REINFORCE++: the KL is in the reward, none of it in the gradient ----------------------------


@pytest.mark.parametrize(
    "estimator, agg",
    [("reinforce_pp", "grpo"), ("reinforce_pp", "dapo"), ("grpo", "grpo"), ("rloo", "dr_grpo")],
)
def test_policy_gradient_against_the_analytic_one(batch, estimator, agg):
    """d loss / d log pi_t = -w_t ratio_t A_t where the unclipped term is the minimum (0 where
    the clipped one is), plus, outside REINFORCE++, beta w_t (1 - exp(ref_t - log pi_t)) (k3);
    w_t is the aggregation's weight of token t. REINFORCE++ advantages come from the rollout's
    log-probs with the KL inside: they are constants of the loss."""
    d, m, beta = batch, batch["mask"], 0.1
    gc = GRPOConfig(
        group_size=K,
        estimator=estimator,
        loss_agg=agg,
        beta=beta,
        clip_low=0.2,
        clip_high=0.28,
        max_new_tokens=max(LENGTHS),
    )
    mask32 = m.astype(np.float32)
    adv = ESTIMATORS[estimator](gc, d["rewards"], d["old"] * m, d["ref"] * m, mask32)
    fn = policy_loss(gc)
    rest = [T(d["old"]), T(d["ref"]), T(adv), T(m), T(m.sum())]
    grad = ms.grad(lambda lp: fn(lp, *rest)[0])(T(d["lp"])).asnumpy()

    A = adv[:, None] if adv.ndim == 1 else adv
    ratio = np.exp(d["lp"] - d["old"])
    unclipped, clipped = ratio * A, np.clip(ratio, 0.8, 1.28) * A
    g = np.where(clipped < unclipped, 0.0, -ratio * A)
    if estimator != "reinforce_pp":
        g = g + beta * (1.0 - np.exp(d["ref"] - d["lp"]))
    b = len(LENGTHS)
    w = {"grpo": 1.0 / (b * m.sum(1, keepdims=True)), "dapo": 1.0 / m.sum()}.get(
        agg, 1.0 / (b * gc.max_new_tokens)
    )
    np.testing.assert_allclose(grad, g * w * m, rtol=2e-4, atol=1e-7)


# ---- overlong penalty -------------------------------------------------------------------------


def test_overlong_penalty_piecewise():
    L_max, L_cache, f = 10, 4, 0.5
    lengths = np.array([0, 3, 6, 7, 8, 9, 10, 11, 14])

    def paper(L):
        if L <= L_max - L_cache:
            return 0.0
        if L <= L_max:
            return ((L_max - L_cache) - L) / L_cache * f
        return -f

    want = [paper(L) for L in lengths]
    np.testing.assert_allclose(overlong_penalty(lengths, L_max, L_cache, f), want, atol=1e-7)
    np.testing.assert_array_equal(overlong_penalty(lengths, L_max, 0, f), 0.0)


# ---- dynamic sampling -------------------------------------------------------------------------


def fake_round(t, idx, rewards, prompt_len, width, rng):
    """A gathered round: row i's prompt holds 1000 * (t + 1) + i, its response random tokens of a
    random length; the response block ``width`` wide."""
    b = len(idx) * K
    lengths = rng.integers(1, width + 1, b)
    rmask = response_mask(lengths, width).astype(np.int32)
    seq = np.zeros((b, prompt_len + width), np.int32)
    seq[:, -width - 2 : -width] = (1000 * (t + 1) + np.arange(b))[:, None]  # 2 prompt tokens
    seq[:, prompt_len:] = rng.integers(1, 50, (b, width)) * rmask
    am = np.concatenate([(seq[:, :prompt_len] > 0).astype(np.int32), rmask], 1)
    g = Generation(seq, am, rmask, prompt_len)
    rew = np.asarray(rewards, np.float64)
    return g, {"reward": rew, "score": rew + 0.0, "row": t * 100 + np.arange(b)}


def test_dynamic_sampling_drops_uniform_groups_and_refills_the_batch():
    rounds = {
        0: [1, 0, 1, 1] + [0, 0, 0, 0] + [0.5] * 4 + [1, 1, 0, 1],  # groups 0 and 3 informative
        1: [1] * 4 + [0, 1, 0, 0] + [0] * 4 + [0.2, 0.3, 0.2, 0.2],  # groups 1 and 3
    }
    widths = {0: (8, 4), 1: (16, 6)}  # the rounds' prompt and response widths differ
    rng, drawn, picked = np.random.default_rng(0), {}, []

    def draw(t, idx):
        drawn[t] = fake_round(t, idx, rounds[t], *widths[t], rng)
        return drawn[t]

    def pick(t, seen):
        picked.append(list(seen))
        return np.arange(4) + 4 * t

    g, cols, counts = fill_batch(draw, pick, 4, K, 5, pad_id=0)
    assert counts == {"groups_dropped": 4, "sampling_tries": 1, "groups_unfilled": 0}
    assert picked == [[], [0, 1, 2, 3]]  # round 1 knows which prompts round 0 drew
    want_rows = [*range(0, 4), *range(12, 16), *range(104, 108), *range(112, 116)]
    np.testing.assert_array_equal(cols["row"], want_rows)
    assert informative_groups(cols["score"], K).all()
    assert g.prompt_len == 16 and g.responses.shape[1] == 6
    for i, r in enumerate(want_rows):  # every kept row's tokens and masks, re-padded
        src, j = drawn[r // 100][0], r % 100
        p, n = src.prompt_len, src.responses.shape[1]
        np.testing.assert_array_equal(g.sequences[i, 16 - p : 16 + n], src.sequences[j])
        np.testing.assert_array_equal(g.attention_mask[i, 16 - p : 16 + n], src.attention_mask[j])
        assert g.attention_mask[i, : 16 - p].sum() == 0 and g.response_mask[i, n:].sum() == 0
        np.testing.assert_array_equal(g.response_mask[i, :n], src.response_mask[j])


def test_dynamic_sampling_tries_are_bounded():
    calls = []

    def draw(t, idx):
        calls.append(t)
        return fake_round(t, idx, [0.0] * 16, 8, 4, np.random.default_rng(t))

    g, cols, counts = fill_batch(draw, lambda t, seen: np.arange(4), 4, K, 3, pad_id=0)
    assert calls == [0, 1, 2, 3]
    assert counts == {"groups_dropped": 12, "sampling_tries": 3, "groups_unfilled": 4}
    np.testing.assert_array_equal(cols["row"], np.arange(16))  # the first groups drawn fill it
    assert len(g.sequences) == 16


def test_more_prompts_are_seeded_and_fresh():
    seen = np.arange(0, 20, 2)
    a = more_prompts(30, 8, 5, it=3, t=1, seen=seen)
    np.testing.assert_array_equal(a, more_prompts(30, 8, 5, it=3, t=1, seen=seen))
    assert len(set(a)) == 8 and not set(a) & set(seen)
    assert list(more_prompts(30, 8, 5, it=3, t=2, seen=seen)) != list(a)
    assert len(more_prompts(12, 8, 5, it=0, t=1, seen=np.arange(10))) == 8  # too few fresh


def test_merge_of_one_generation_is_itself():
    g, _ = fake_round(0, range(2), [0.0] * 8, 8, 4, np.random.default_rng(1))
    m = merge_generations([g], 0)
    for a, b in zip(
        (m.sequences, m.attention_mask, m.response_mask),
        (g.sequences, g.attention_mask, g.response_mask),
    ):
        np.testing.assert_array_equal(a, b)
    assert m.prompt_len == g.prompt_len


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key",
    [
        ("grpo:\n  estimator: ppo\n", "grpo.estimator must be one of"),
        ("grpo:\n  loss_agg: mean\n", "grpo.loss_agg must be one of"),
        ("grpo:\n  clip_low: 1.5\n", "grpo.clip_low must be in (0, 1)"),
        ("grpo:\n  clip_low: 0\n", "grpo.clip_low must be in (0, 1)"),
        ("grpo:\n  clip_high: -0.1\n", "grpo.clip_high must be > 0"),
        ("grpo:\n  overlong_buffer: -1\n", "grpo.overlong_buffer must be >= 0"),
        ("grpo:\n  overlong_buffer: 7\n  max_new_tokens: 6\n", "grpo.overlong_buffer (7)"),
        ("grpo:\n  overlong_penalty: -1.0\n", "grpo.overlong_penalty must be >= 0"),
        ("grpo:\n  dynamic_sampling_max_tries: 0\n", "grpo.dynamic_sampling_max_tries"),
        ("grpo:\n  estimator: rloo\n  std_normalize: false\n", "grpo.std_normalize"),
        ("grpo:\n  dynamic_sampling: 1\n", "grpo.dynamic_sampling"),
    ],
)
def test_bad_estimator_settings_name_the_key(tmp_path, text, key):
    assert_config_rejects(tmp_path, text, key)


@pytest.mark.parametrize("profile", ["demo", "smollm2-135m", "cluster-2x8-ascend"])
def test_shipped_profiles_run_todays_grpo(profile):
    gc = load_config(profile).grpo
    assert (gc.estimator, gc.loss_agg, gc.dynamic_sampling, gc.overlong_buffer) == (
        "grpo",
        "grpo",
        False,
        0,
    )
    assert gc.clip_bounds == (gc.clip_range, gc.clip_range) and gc.scales_by_std


# ---- the stage ------------------------------------------------------------------------------

VARIANT = {
    "estimator": "rloo",
    "loss_agg": "dapo",
    "clip_low": 0.2,
    "clip_high": 0.28,
    "dynamic_sampling": True,
    "dynamic_sampling_max_tries": 3,
    "overlong_buffer": 2,
    "overlong_penalty": 0.5,
    "iterations": 3,
    "ckpt_every": 2,
    "old_logprobs": "sampling",  # through the gather, dynamic sampling's merge and a resume
}


@pytest.fixture(scope="module")
def variant_run(tiny_chain, tmp_path_factory):
    """The non-default GRPO on the tiny chain, run once (one worker) for both tests below:
    (store root, config, inputs, the clean run's result)."""
    from conftest import tiny_full_overrides
    from mindrlhf.launch import run_stage

    over = tiny_full_overrides(tiny_chain.root)
    over["grpo"].update(VARIANT)
    d = tiny_chain.data
    inputs = {
        "prompts": d["prompts_arithmetic_train"],
        "heldout": d["prompts_arithmetic_heldout"],
        "sft": tiny_chain.sft,
    }
    cfg = load_config("demo", over)
    run_dir = tmp_path_factory.mktemp("grpo-variant") / "clean"
    clean = run_stage("grpo", cfg, inputs, tiny_chain.root, run_dir, log=lambda s: None)
    return tiny_chain.root, cfg, inputs, clean


@pytest.mark.slow
def test_a_non_default_grpo_runs_resumes_and_reports_its_counts(variant_run, tmp_path):
    """rloo + DAPO token mean + clip-higher + dynamic sampling + overlong penalty: finite
    metrics, the sampling counts in every iteration's row; killed after its checkpoint it
    resumes to the same artifacts, and a rerun that reuses a recorded rollout reports the same
    counts (read back from the rollout's manifest)."""
    from mindrlhf.launch import StageFailed, run_stage
    from mindrlhf.stages.common import KILL_AFTER_CKPT

    root, cfg, inputs, clean = variant_run
    quiet = dict(log=lambda s: None)
    hist = clean["history"]
    assert len(hist) == 3
    for row in hist:
        assert all(np.isfinite(v) for v in row.values() if isinstance(v, float))
        assert {"groups_dropped", "sampling_tries", "groups_unfilled", "overlong_penalty"} <= set(
            row
        )
        assert 0 <= row["sampling_tries"] <= 3 and row["overlong_penalty"] <= 0
    crash = tmp_path / "crash"
    with pytest.raises(StageFailed) as e:
        run_stage("grpo", cfg, inputs, root, crash, env={KILL_AFTER_CKPT: "2"}, **quiet)
    assert e.value.returncode == -signal.SIGKILL
    resumed = run_stage("grpo", cfg, inputs, root, crash, **quiet)
    assert resumed["outputs"] == clean["outputs"] and resumed["history"] == hist
    lines = []
    again = run_stage("grpo", cfg, inputs, root, crash, log=lines.append)
    assert any("iteration 2: reusing rollout" in ln for ln in lines)
    assert again["outputs"] == clean["outputs"] and again["history"] == hist


@pytest.mark.slow
def test_sampled_old_logprobs_are_the_policys_recomputed(variant_run):
    """grpo.old_logprobs: sampling -- the first rollout's stored log-probs (read off the sampler,
    then carried through dynamic sampling's row picking and merge) are those a forward pass of
    the SFT policy that sampled it gives on the stored sequences, row by row and token by
    token. Its reference log-probs, scored with each group's prompt run once
    (share_prompts), are the reference's (the same SFT checkpoint) full forward pass."""
    from conftest import assert_rollout_logprobs_of
    from mindrlhf.data.store import ArtifactStore

    root, cfg, inputs, clean = variant_run
    store = ArtifactStore(root)
    first = next(
        i
        for i in store.get(clean["outputs"]["metrics"]).parents
        if store.get(i).meta["iteration"] == 0
    )
    assert_rollout_logprobs_of(store, first, inputs["sft"], cfg)
    assert_rollout_logprobs_of(store, first, inputs["sft"], cfg, column="ref_logprobs")


@pytest.mark.slow
def test_a_non_default_grpo_on_two_workers_takes_the_steps_of_one(variant_run, tmp_path):
    """DAPO's token mean divides by the whole mini-batch's token count (not a rank's) and dynamic
    sampling decides on the gathered rollout: 2 msrun workers sample the same rollouts, report
    the same counts and end at the weights of 1."""
    from conftest import free_port, tiny_full_overrides
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage

    root, _, inputs, clean = variant_run
    store = ArtifactStore(root)

    def what_it_did(res):
        ids = sorted(
            store.get(res["outputs"]["metrics"]).parents,
            key=lambda i: store.get(i).meta["iteration"],
        )
        seqs = [store.read_dataset(i).column("sequence").to_pylist() for i in ids]
        weights = store.read_checkpoint(res["outputs"]["checkpoint"])
        counts = [(h["groups_dropped"], h["sampling_tries"]) for h in res["history"]]
        return seqs, weights, counts

    over = tiny_full_overrides(root)
    over["grpo"].update(VARIANT)
    over["parallel"] = {"worker_num": 2, "local_worker_num": 2, "master_port": free_port()}
    c = load_config("demo", over)
    two = run_stage("grpo", c, inputs, root, tmp_path / "w2", log=lambda s: None)
    (s1, w1, c1), (s2, w2, c2) = what_it_did(clean), what_it_did(two)
    assert len(s1) == VARIANT["iterations"]
    assert s1 == s2 and c1 == c2
    for k, v in w1.items():
        np.testing.assert_allclose(w2[k], v, atol=2e-5, rtol=1e-4, err_msg=k)
