"""``model.backend: mindformers``: MindFormers 1.9's LlamaForCausalLM behind our policy interface
(models/mindformers_backend.py). Same weights in both backends give the same logits, SFT-loss
gradients and greedy generations; the weight mapping is a rename that MindFormers' own forward
agrees with (RoPE halves, grouped kv heads); checkpoints cross backends both ways.

Every model here has non-trivial random weights (conftest.randomize: norms not 1, biases not 0,
sharpened attention), GQA (4 query heads on 2 kv heads) and left-padded rows."""

import dataclasses
import importlib.util

import numpy as np
import pytest
from mindspore import Tensor

from conftest import randomize, tiny_model_cfg
from mindrlhf.algos.sft import sft_loss
from mindrlhf.config import GenerationConfig, OptimConfig
from mindrlhf.models.decoder import CausalLM, ScalarHeadModel, load_state_dict, state_dict
from mindrlhf.models.generation import generate, left_pad
from mindrlhf.runtime import Dist
from mindrlhf.stages.common import Trainer

if importlib.util.find_spec("mindformers") is None:
    pytest.skip("mindformers is not installed", allow_module_level=True)
from mindrlhf.models.mindformers_backend import import_mindformers  # noqa: E402

import_mindformers()  # before anything imports mindformers: its log files out of the cwd

CASES = {  # LLaMA with GQA and its own head; Qwen2's q/k/v bias with tied embeddings
    "llama_gqa": dict(tie_embeddings=False),
    "qwen2_bias": dict(qkv_bias=True, tie_embeddings=True),
}


def mf_cfg(case: str, **kw):
    return tiny_model_cfg("llama", backend="mindformers", **CASES[case], **kw)


def pair(case: str, seed: int = 1):
    """(MindFormers-backed model, native model) holding the same random weights."""
    from mindrlhf.models.mindformers_backend import MindFormersCausalLM

    cfg = mf_cfg(case)
    native = CausalLM(dataclasses.replace(cfg, backend="native"), seed=0)
    w = randomize(native, seed=seed, qk_scale=3.0)
    mf = MindFormersCausalLM(cfg, seed=7)
    load_state_dict(mf, w)
    return mf, native, w


def padded_batch(rng, lengths=(14, 9, 4, 12), vocab=97):
    """Left-padded rows of different lengths (tokens >= 1: id 0 is the pad)."""
    ids, mask = left_pad([list(rng.integers(1, vocab, n)) for n in lengths], 0)
    return ids, mask


def plain_mindformers(cfg, tensors: dict):
    """MindFormers' own LlamaForCausalLM, weights loaded by its own loader by its own names."""
    import mindspore as ms

    from mindrlhf.models.mindformers_backend import import_mindformers, llama_config

    import_mindformers()
    from mindformers import LlamaForCausalLM

    net = LlamaForCausalLM(llama_config(cfg, "CPU"))
    params = {k: ms.Parameter(Tensor(v), name=k) for k, v in tensors.items()}
    not_loaded, unused = ms.load_param_into_net(net, params)
    assert not not_loaded and not unused, (not_loaded, unused)
    net.set_train(False)
    return net


def own_forward_logits(net, ids: np.ndarray) -> np.ndarray:
    """MindFormers' LlamaForCausalLM.construct in inference: its own positions 0..T-1, its own
    causal mask (so: rows without padding; static shapes: T must be its seq_length)."""
    out = net(Tensor(ids))
    logits = out[0] if isinstance(out, tuple) else out
    return logits.asnumpy().reshape(ids.shape[0], ids.shape[1], -1)


# ---- weight mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_mapping_round_trip_is_exact_and_names_are_mindformers_own(case):
    """ours -> MindFormers -> ours gives back every tensor bit for bit; the names are exactly the
    parameters of MindFormers' LlamaForCausalLM and what MindFormers' own Hugging Face converter
    (LlamaForCausalLM.convert_weight_dict) makes of our Hugging Face export."""
    from mindformers import LlamaForCausalLM

    from mindrlhf.models.hf import to_hf
    from mindrlhf.models.mindformers_backend import from_mindformers, llama_config, to_mindformers

    cfg = mf_cfg(case)
    w = randomize(CausalLM(cfg, seed=0), seed=2)
    theirs = to_mindformers(cfg, w)
    back = from_mindformers(cfg, theirs)
    assert back.keys() == w.keys()
    for k in w:
        assert back[k].dtype == w[k].dtype and np.array_equal(back[k], w[k]), k
    net = LlamaForCausalLM(llama_config(cfg, "CPU"))
    shapes = {n: tuple(p.shape) for n, p in net.parameters_and_names()}
    assert {k: v.shape for k, v in theirs.items()} == shapes
    converted = LlamaForCausalLM.convert_weight_dict(to_hf(cfg, w)[0])
    assert converted.keys() == theirs.keys()
    for k in theirs:
        assert np.array_equal(converted[k], theirs[k]), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_mindformers_own_forward_on_mapped_weights_equals_native(case, rng):
    """The layout check that does not go through our wrapper: our tensors, renamed for
    MindFormers and loaded by MindFormers' own loader, run through MindFormers' own forward
    (its FreqsMgr, RotaryEmbedding, _repeat_kv), give our decoder's logits. A q/k row order for
    interleaved RoPE pairs, or query heads grouped on the kv heads another way, fails here."""
    from mindrlhf.models.mindformers_backend import to_mindformers

    cfg = mf_cfg(case)
    native = CausalLM(dataclasses.replace(cfg, backend="native"), seed=0)
    w = randomize(native, seed=3, qk_scale=3.0)
    net = plain_mindformers(cfg, to_mindformers(cfg, w))
    ids = rng.integers(1, cfg.vocab_size, (3, cfg.max_seq_len)).astype(np.int32)
    ours = native(Tensor(ids), Tensor(np.ones_like(ids)))[0].asnumpy()
    np.testing.assert_allclose(own_forward_logits(net, ids), ours, atol=1e-4, rtol=0)


# ---- the wrapper: logits, gradients --------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_native_on_left_padded_rows(case, rng):
    mf, native, _ = pair(case)
    ids, mask = padded_batch(rng)
    a = mf(Tensor(ids), Tensor(mask))[0].asnumpy()
    b = native(Tensor(ids), Tensor(mask))[0].asnumpy()
    real = mask.astype(bool)  # padded positions' logits are never read
    assert np.abs(b[real]).max() > 1.0  # logits of some size, not a model that says nothing
    np.testing.assert_allclose(a[real], b[real], atol=1e-4, rtol=0)
    p = 6
    ra = mf.response_logits(Tensor(ids), Tensor(mask), p).asnumpy()
    rb = native.response_logits(Tensor(ids), Tensor(mask), p).asnumpy()
    np.testing.assert_allclose(ra, rb, atol=1e-4, rtol=0)


def test_dpo_sequence_logps_read_mindformers_hidden_states(rng):
    """models/head.py on the MindFormers backend: the projection at the scored positions of its
    own hidden states (no packing: it takes no segments), the native model's sums on the same
    weights; left-padded rows, as generation leaves them (which the native model packs)."""
    from mindrlhf.models import head

    mf, native, _ = pair(sorted(CASES)[0])
    ids, mask = padded_batch(rng)
    resp = mask.astype(np.float32)
    resp[:, : ids.shape[1] - 3] = 0  # the last three tokens of each row are its response
    args = (Tensor(ids), Tensor(mask), Tensor(resp))
    got = head.sequence_logps(mf, *args, per_row=2).asnumpy()
    want = head.sequence_logps(native, *args, per_row=1).asnumpy()
    assert np.abs(want).min() > 1.0
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    packed = head.sequence_logps(native, *args, per_row=2).asnumpy()  # left padding dropped
    np.testing.assert_allclose(packed, want, atol=1e-4, rtol=1e-5)


def test_wrapper_equals_mindformers_own_forward(rng):
    """On rows without padding, where MindFormers' own positions and mask are right, the wrapper
    (which makes them itself for padded rows) gives exactly what LlamaForCausalLM.construct
    gives with the same Parameters."""
    mf, _, _ = pair("llama_gqa")
    mf.net.set_train(False)
    ids = rng.integers(1, 97, (2, mf.cfg.max_seq_len)).astype(np.int32)
    ours = mf(Tensor(ids), Tensor(np.ones_like(ids)))[0].asnumpy()
    np.testing.assert_allclose(own_forward_logits(mf.net, ids), ours, atol=1e-5, rtol=0)


def test_compiled_rollout_scoring_equals_native(rng):
    """PPO/GRPO score rollouts with a jit-compiled forward (rollout.score_rollout): the
    MindFormers model compiled gives the native model's response log-probs."""
    from mindrlhf.stages.rollout import response_logprobs, score_rollout

    mf, native, _ = pair("qwen2_bias")
    ids, mask = padded_batch(rng)
    a = score_rollout(response_logprobs, mf, ids, mask, 6, compiled=True)
    b = score_rollout(response_logprobs, native, ids, mask, 6, compiled=False)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def sft_grads(model, params_by_name, batch):
    import mindspore as ms

    ids, am, lm = (Tensor(x) for x in batch)
    names = {id(p): n for n, p in params_by_name.items()}
    params = model.trainable_params()

    def loss_fn(ids, am, lm):
        logits, _ = model(ids, am)
        return sft_loss(logits, ids, lm)

    loss, grads = ms.value_and_grad(loss_fn, None, params)(ids, am, lm)
    return float(loss.asnumpy()), {names[id(p)]: g.asnumpy() for p, g in zip(params, grads)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sft_loss_and_gradients_equal_native(case, rng):
    """The SFT loss and its gradient for every weight, by our names, within 1e-4 relative."""
    mf, native, _ = pair(case)
    ids, mask = padded_batch(rng)
    lm = (mask * (np.arange(ids.shape[1])[None] >= 8)).astype(np.float32)
    batch = (ids, mask, lm)
    la, ga = sft_grads(mf, dict(mf.shared_decoder.parameters_and_names()), batch)
    lb, gb = sft_grads(native, dict(native.parameters_and_names()), batch)
    assert abs(la - lb) <= 1e-4 * abs(lb)
    assert ga.keys() == gb.keys() == set(state_dict(native))
    for k in gb:
        scale = np.abs(gb[k]).max()
        assert scale > 0, k
        assert np.abs(ga[k] - gb[k]).max() <= 1e-4 * scale, k


# ---- generation and checkpoints --------------------------------------------------------------


def sft_fn(model):
    def loss_fn(ids, am, lm):
        logits, _ = model(ids, am)
        loss = sft_loss(logits, ids, lm)
        return loss, loss

    return loss_fn


@pytest.mark.parametrize("compiled", [True, False])
def test_greedy_generation_equals_native_and_follows_training(compiled, rng):
    """Rollouts of the MindFormers-backed policy run our KV-cache decoder on its Parameters
    (shared, nothing copied): greedy tokens equal the native model's, each one is the argmax of
    the MindFormers forward over the sequence so far, and after training steps of the
    MindFormers model (the decode graph compiled before them) they equal a fresh native model
    loaded with the trained weights."""
    mf, native, _ = pair("llama_gqa", seed=4)
    ids, mask = padded_batch(rng, lengths=(7, 3, 5))
    gen = GenerationConfig(max_new_tokens=10, do_sample=False, compiled=compiled)
    g = generate(mf, ids, mask, gen, -1, 0)
    np.testing.assert_array_equal(g.sequences, generate(native, ids, mask, gen, -1, 0).sequences)
    logits = mf(Tensor(g.sequences), Tensor(g.attention_mask))[0].asnumpy()
    p = g.prompt_len
    np.testing.assert_array_equal(logits[:, p - 1 : -1].argmax(-1), g.responses)

    mf.set_train(True)
    t = Trainer(mf.trainable_params(), sft_fn(mf), OptimConfig(lr=5e-2, compiled=False), Dist(), 5)
    for _ in range(3):
        lm = (g.attention_mask * (np.arange(g.sequences.shape[1])[None] >= p)).astype(np.float32)
        t.step(Tensor(g.sequences), Tensor(g.attention_mask), Tensor(lm))
    trained = generate(mf, ids, mask, gen, -1, 0)
    fresh = CausalLM(dataclasses.replace(mf.cfg, backend="native"), seed=99)
    load_state_dict(fresh, state_dict(mf))
    ref = generate(fresh, ids, mask, gen, -1, 0, use_cache=False)
    np.testing.assert_array_equal(trained.sequences, ref.sequences)
    assert not np.array_equal(trained.sequences, g.sequences)  # the steps changed the rollouts


def test_checkpoints_cross_backends_and_export(store, rng, tmp_path):
    """A checkpoint written from the MindFormers-backed model (our names) loads into the native
    decoder and back with equal logits, and ``mindrlhf export`` takes it (its manifest says
    backend: mindformers)."""
    from argparse import Namespace

    from mindrlhf.cli import cmd_export
    from mindrlhf.config import Config
    from mindrlhf.models.mindformers_backend import MindFormersCausalLM
    from mindrlhf.stages.common import model_meta

    cfg = mf_cfg("llama_gqa")
    mf = MindFormersCausalLM(cfg, seed=5)
    randomize(mf, seed=6, qk_scale=2.0)
    full = Config(model=cfg)
    art = store.write_checkpoint(
        state_dict(mf), name="mf-sft", parents=[], meta={"model": model_meta(full)}
    )
    assert art.meta["model"]["backend"] == "mindformers"
    native = CausalLM(dataclasses.replace(cfg, backend="native"), seed=0)
    load_state_dict(native, store.read_checkpoint(art.id))
    ids, mask = padded_batch(rng)
    a = native(Tensor(ids), Tensor(mask))[0].asnumpy()
    np.testing.assert_allclose(mf(Tensor(ids), Tensor(mask))[0].asnumpy(), a, atol=1e-4)
    again = MindFormersCausalLM(cfg, seed=0)  # and native -> MindFormers
    load_state_dict(again, state_dict(native))
    np.testing.assert_allclose(again(Tensor(ids), Tensor(mask))[0].asnumpy(), a, atol=1e-4)
    assert cmd_export(Namespace(store=str(store.root), ref=art.id, out=str(tmp_path / "hf"))) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_seeded_init_equals_native():
    """A run from scratch starts from the same weights with either backend."""
    from mindrlhf.models.mindformers_backend import MindFormersCausalLM

    cfg = mf_cfg("llama_gqa")
    a = state_dict(MindFormersCausalLM(cfg, seed=11))
    b = state_dict(CausalLM(cfg, seed=11))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- config -------------------------------------------------------------------------------------


SEMI_AUTO = {  # 2 nodes x 8 NPUs: 2 data x 4 model x 2 pipeline (all different: a swap shows)
    "model.family": "llama",
    "model.backend": "mindformers",
    "model.n_layers": 4,
    "model.n_heads": 8,
    "model.n_kv_heads": 4,
    "device_target": "Ascend",
    "parallel": {
        "mode": "semi_auto",
        "worker_num": 16,
        "local_worker_num": 8,
        "data_parallel": 2,
        "model_parallel": 4,
        "pipeline_stages": 2,
        "micro_batches": 4,
        "optimizer_shard": True,
        "recompute": True,
    },
}


@pytest.mark.parametrize(
    "sets, key",
    [
        ({"model.backend": "mindformers"}, "model.backend"),  # demo is gpt2
        (
            {"model.family": "llama", "model.backend": "mindformers", "model.qk_norm": True},
            "qk_norm",
        ),
        (
            {"model.family": "llama", "model.backend": "mindformers", "sft.packing": True},
            "sft.packing",
        ),
        (  # MindFormers splits the kv heads model_parallel ways: 2 of them cannot go 4 ways
            {**SEMI_AUTO, "model.n_kv_heads": 2},
            "model.n_kv_heads",
        ),
        (  # MindFormers' generate needs MindFormers' model
            {"model.family": "llama", "generation.engine": "mindformers"},
            "model.backend: mindformers",
        ),
        (  # and its use_past kernels an NPU
            {
                "model.family": "llama",
                "model.backend": "mindformers",
                "generation.engine": "mindformers",
            },
            "runs on Ascend only",
        ),
    ],
)
def test_unsupported_settings_are_refused_naming_the_key(sets, key):
    from mindrlhf.config import ConfigError, load_config

    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        load_config("demo", dotted(sets))


def test_semi_auto_builds_mindformers_own_parallel_config(monkeypatch):
    """#18 item 4: with parallel.mode semi_auto, MindFormers' TransformerOpParallelConfig comes
    from our parallel section and MindFormers shards its own cells from it, the same
    Megatron-style split as our decoder's strategies for the same projections. Built under the
    semi-auto parallel context as on Ascend; the 8-device collective group cannot exist in one
    CPU process, so MindFormers' query of its size answers worker_num."""
    import mindspore as ms
    from mindformers.modules.transformer import op_parallel_config as opc

    from mindrlhf.config import load_config
    from mindrlhf.models.mindformers_backend import name_map, op_parallel_config
    from mindrlhf.models.policy import build_policy
    from mindrlhf.parallel import apply_parallel, auto_parallel_context, matmul_strategies

    cfg = load_config("demo", dotted(SEMI_AUTO))  # accepted now, validated as before
    p = cfg.parallel
    mf = op_parallel_config(p)
    sizes = (mf.data_parallel, mf.model_parallel, mf.pipeline_stage, mf.micro_batch_num)
    assert sizes == (2, 4, 2, 4)
    assert mf.optimizer_shard is True and mf.recompute.recompute is True

    monkeypatch.setattr(opc.D, "get_group_size", lambda *a: p.worker_num)
    ms.set_auto_parallel_context(**auto_parallel_context(p))
    try:
        model = build_policy(cfg.model, seed=0, parallel=p)
        native = build_policy(dataclasses.replace(cfg.model, backend="native"), 0, parallel=p)
    finally:
        ms.reset_auto_parallel_context()
    theirs = dict(model.net.cells_and_names())
    ours = dict(native.cells_and_names())
    sharded = 0
    for name, mf_name in name_map(cfg.model).items():
        leaf = name.rsplit(".", 2)[-2]
        if leaf not in matmul_strategies(p):
            continue
        want = ours[name.rsplit(".", 1)[0]].mm.in_strategy
        got = theirs[mf_name.rsplit(".", 1)[0]].matmul.in_strategy
        assert got == want == matmul_strategies(p)[leaf], (name, mf_name, got, want)
        sharded += 1
    assert sharded == 7 * cfg.model.n_layers
    layers = model.net.model.layers
    assert [b.pipeline_stage for b in layers] == [0, 0, 1, 1]
    assert all(b._has_config_recompute for b in layers)
    apply_parallel(model, p)  # leaves MindFormers' own sharding alone (it has no .model)


def test_lora_with_the_mindformers_backend_is_refused():
    """LoRA wraps our decoder's projections; on MindFormers' cells it would train nothing."""
    from mindrlhf.config import ConfigError, load_config

    sets = {"model.backend": "mindformers", "model.lora": {"rank": 4, "alpha": 8}}
    with pytest.raises((ConfigError, ValueError), match=r"model\.lora"):
        load_config("smollm2-135m", dotted(sets))


def dotted(sets: dict) -> dict:
    out: dict = {}
    for k, v in sets.items():
        d = out
        *head, last = k.split(".")
        for h in head:
            d = d.setdefault(h, {})
        d[last] = v
    return out


def test_stage_key_includes_the_backend():
    from mindrlhf.config import load_config
    from mindrlhf.keys import stage_key

    native = load_config("demo", dotted({"model.family": "llama"}))
    mf = load_config("demo", dotted({"model.family": "llama", "model.backend": "mindformers"}))
    assert native.model.backend == "native"  # the default
    for stage in ("sft", "ppo", "grpo", "dpo", "reflogp", "evaluate"):
        assert stage_key(stage, native.to_dict(), {}) != stage_key(stage, mf.to_dict(), {})


# ---- a real model, a real stage ---------------------------------------------------------------


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    """The stages' default compiled step (mindspore.jit over MindFormers' cells) takes the eager
    step's losses and leaves the same weights."""
    from mindrlhf.models.mindformers_backend import MindFormersCausalLM

    rng = np.random.default_rng(0)
    data = []
    for _ in range(4):
        ids, mask = padded_batch(rng, lengths=(16, 11, 6, 16))
        lm = (mask * (np.arange(16)[None] >= 4)).astype(np.float32)
        data.append(tuple(Tensor(x) for x in (ids, mask, lm)))
    out = {}
    for compiled in (False, True):
        m = MindFormersCausalLM(mf_cfg("llama_gqa"), seed=3)
        m.set_train(True)
        t = Trainer(
            m.trainable_params(), sft_fn(m), OptimConfig(lr=3e-3, compiled=compiled), Dist(), 10
        )
        out[compiled] = (np.array([t.step(*bt)[:2] for bt in data]), state_dict(m))
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for k, v in out[False][1].items():
        np.testing.assert_allclose(out[True][1][k], v, atol=2e-6, err_msg=k)


@pytest.mark.slow
def test_smollm2_logits_equal_native():
    """The real SmolLM2-135M (30 layers, 9 heads on 3 kv heads, tied embeddings) in both backends:
    equal logits on one short left-padded pair of passages."""
    from mindrlhf.data import registry
    from mindrlhf.data.tokenizer import SMOLLM2_GGUF
    from mindrlhf.models.gguf_import import load_gguf
    from mindrlhf.models.mindformers_backend import MindFormersCausalLM

    g = load_gguf(str(registry.extract_to_cache("smollm2", SMOLLM2_GGUF)))
    cfg = dataclasses.replace(g.config, max_seq_len=64)
    rows = [
        g.tokenizer.encode(t).ids for t in ("The capital of France is", "2 + 3 = 5, and 4 + 4 =")
    ]
    ids, mask = left_pad(rows, 0)
    native = CausalLM(cfg, seed=0)
    load_state_dict(native, g.tensors)
    want = native(Tensor(ids), Tensor(mask))[0].asnumpy()
    del native
    mf = MindFormersCausalLM(dataclasses.replace(cfg, backend="mindformers"), seed=0)
    load_state_dict(mf, g.tensors)
    got = mf(Tensor(ids), Tensor(mask))[0].asnumpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_sft_stage_loss_curve_equals_native(tmp_path):
    """The SFT stage process of the demo config (family llama, its sizes; a small data slice),
    run with each backend from the same seeded init: held-out losses and the loss of every one
    of the first steps agree within 1e-3, and the checkpoints hold the same names."""
    from conftest import tiny_overrides
    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage

    root = tmp_path / "store"
    over = tiny_overrides(root, steps=8, log_every=1, ckpt_every=100, lr=2e-3)
    over["model"] = {"family": "llama"}  # the demo's sizes: 3 layers, d=96, 4 heads
    cfg = load_config("demo", over)
    quiet = dict(log=lambda s: None)
    d = run_stage("prepare", cfg, {}, root, tmp_path / "prepare", **quiet)["outputs"]
    inputs = {"train": d["sft_train"], "heldout": d["sft_heldout"]}
    res = {}
    for backend in ("native", "mindformers"):
        over["model"] = {"family": "llama", "backend": backend}
        c = load_config("demo", over)
        res[backend] = run_stage("sft", c, inputs, root, tmp_path / backend, **quiet)
    a, b = res["mindformers"], res["native"]
    curve_a, curve_b = np.array(a["loss_curve"]), np.array(b["loss_curve"])
    assert curve_a.shape == curve_b.shape == (8, 2)
    np.testing.assert_allclose(curve_a, curve_b, atol=1e-3, rtol=0)
    for k in ("heldout_loss_before", "heldout_loss_after"):
        assert abs(a["metrics"][k] - b["metrics"][k]) <= 1e-3, k
    store = ArtifactStore(root)
    wa, wb = (store.read_checkpoint(r["outputs"]["checkpoint"]) for r in (a, b))
    assert wa.keys() == wb.keys()


@pytest.mark.slow
def test_rl_stages_run_unchanged_on_the_mindformers_backend(tmp_path):
    """The tiny chain (family llama) with model.backend: mindformers, every stage a real process:
    SFT, RM (MindFormers backbone, our scalar head), PPO (its critic too), GRPO, reference
    log-probs and DPO finish and write checkpoints in our names that the native models load."""
    from conftest import tiny_full_overrides
    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage

    root = tmp_path / "store"
    over = tiny_full_overrides(root)
    over["model"] = {**over["model"], "family": "llama", "backend": "mindformers"}
    over["pipeline"] = {"stages": ["prepare", "sft", "rm", "ppo", "grpo", "dpo"]}
    cfg = load_config("demo", over)
    q = dict(log=lambda s: None)

    def stage(name, inputs):
        return run_stage(name, cfg, inputs, root, tmp_path / name, **q)["outputs"]

    d = stage("prepare", {})
    sft = stage("sft", {"train": d["sft_train"], "heldout": d["sft_heldout"]})["checkpoint"]
    rm = stage("rm", {"train": d["pairs_train"], "heldout": d["pairs_heldout"], "sft": sft})
    p, g = cfg.ppo.prompts, cfg.grpo.prompts
    ppo = stage(
        "ppo",
        {
            "prompts": d[f"prompts_{p}_train"],
            "heldout": d[f"prompts_{p}_heldout"],
            "sft": sft,
            "rm": rm["checkpoint"],
        },
    )
    grpo = stage(
        "grpo",
        {"prompts": d[f"prompts_{g}_train"], "heldout": d[f"prompts_{g}_heldout"], "sft": sft},
    )
    pairs = {"train": d["pairs_train"], "heldout": d["pairs_heldout"]}
    ref = stage("reflogp", {**pairs, "model": sft})
    dpo = stage(
        "dpo",
        {**pairs, "sft": sft, "ref_train": ref["train"], "ref_heldout": ref["heldout"]},
    )
    store = ArtifactStore(root)
    native_cfg = dataclasses.replace(cfg.model, backend="native")
    for ckpt in (sft, ppo["checkpoint"], grpo["checkpoint"], dpo["checkpoint"]):
        assert store.get(ckpt).meta["model"]["backend"] == "mindformers"
        load_state_dict(CausalLM(native_cfg, seed=0), store.read_checkpoint(ckpt))
    load_state_dict(ScalarHeadModel(native_cfg, seed=0), store.read_checkpoint(rm["checkpoint"]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_critic_and_reward_model_equal_native(case, rng):
    """The scalar-head model (critic / RM) on MindFormers' backbone: by our names the state dict
    of ScalarHeadModel (so an RM moves across backends), the same seeded init, values within 1e-4
    on left-padded rows and the gradient of every weight of a pairwise RM loss within 1e-4
    relative."""
    import mindspore as ms

    from mindrlhf.algos.rm import bradley_terry_loss, gather_last
    from mindrlhf.models.policy import build_scalar_head

    cfg = mf_cfg(case)
    ncfg = dataclasses.replace(cfg, backend="native")
    mf, native = build_scalar_head(cfg, seed=3), build_scalar_head(ncfg, seed=3)
    assert isinstance(native, ScalarHeadModel)
    a, b = state_dict(mf), state_dict(native)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    w = randomize(native, seed=4, qk_scale=3.0)
    load_state_dict(mf, w)
    ids, mask = padded_batch(rng)
    ids, mask = Tensor(ids), Tensor(mask)
    np.testing.assert_allclose(
        mf(ids, mask).asnumpy(), native(ids, mask).asnumpy(), atol=1e-4, rtol=0
    )

    def grads(model):
        ours = getattr(model, "shared_decoder", model)
        names = {id(p): n for n, p in ours.parameters_and_names()}
        params = model.trainable_params()

        def loss_fn(i, m):
            r = gather_last(model(i, m), m)
            return bradley_terry_loss(r[:2], r[2:])[0]

        _, g = ms.value_and_grad(loss_fn, None, params)(ids, mask)
        return {names[id(p)]: x.asnumpy() for p, x in zip(params, g)}

    ga, gb = grads(mf), grads(native)
    assert ga.keys() == gb.keys() == set(b)
    # a pairwise loss does not see the head's bias (it cancels in r_chosen - r_rejected)
    assert abs(ga.pop("score.bias")).max() < 1e-6 and abs(gb.pop("score.bias")).max() < 1e-6
    for k in gb:
        scale = np.abs(gb[k]).max()
        assert scale > 0, k
        assert np.abs(ga[k] - gb[k]).max() <= 1e-4 * scale, k


# ---- generation.engine: mindformers (MindFormers' own generate; use_past on Ascend) -----------


def mf_engine(mf, rows: int):
    """The MindFormers engine on ``mf``'s weights without use_past (its KV-cache kernels are
    Ascend-only), greedy argmax by a CPU kernel: MindFormers' generate calls mint.argmax, whose
    ArgMaxExt MindSpore 2.9 has no CPU build of. Everything else is MindFormers' own loop."""
    from mindspore import ops

    from mindrlhf.models.mindformers_generation import generator

    eng = generator(mf, rows, use_past=False)
    eng.net.argmax = lambda x, dim: ops.argmax(x, dim)
    return eng


@pytest.mark.parametrize("case", CASES)
def test_mindformers_engine_greedy_equals_native_with_eos_and_left_padding(case, rng):
    """MindFormers' generate on the policy's weights (left-padded prompts crossing to its right
    padding and back, rows stopping at eos at different steps) gives the native generator's
    sequences, attention mask and response mask exactly (tied: the head is the embedding)."""
    mf, native, _ = pair(case, seed=4)
    ids, mask = padded_batch(rng, lengths=(7, 3, 5))
    gen = GenerationConfig(max_new_tokens=10, do_sample=False)
    free = generate(native, ids, mask, gen, -1, 0).responses
    eos = int(free[0, 4])  # row 0 stops at step 5; the others where (if) they meet it
    ref = generate(native, ids, mask, gen, eos, 0)
    assert ref.response_mask[0].sum() <= 5 and ref.response_mask.sum(1).max() > 5
    got = mf_engine(mf, 3).generate(ids, mask, gen, eos, 0)
    assert got.prompt_len == ref.prompt_len
    np.testing.assert_array_equal(got.sequences, ref.sequences)
    np.testing.assert_array_equal(got.attention_mask, ref.attention_mask)
    np.testing.assert_array_equal(got.response_mask, ref.response_mask)


def test_mindformers_engine_samples_the_policy_at_its_temperature():
    """Sampled first tokens of one prompt, 2048 draws: their frequencies match softmax(logits / T)
    of our forward (total variation ~0.07 of sampling noise; the law at T = 1, a dropped
    temperature, is 0.3 away), and the same seed draws the same tokens."""
    mf, native, _ = pair("llama_gqa", seed=4)
    ids, mask = left_pad([[11, 23, 5, 42, 7]] * 2048, 0)
    t = 0.4
    gen = GenerationConfig(max_new_tokens=1, do_sample=True, temperature=t)
    eng = mf_engine(mf, 2048)
    got = eng.generate(ids, mask, gen, -1, 0, seed=5)
    np.testing.assert_array_equal(
        got.sequences[:64], eng.generate(ids[:64], mask[:64], gen, -1, 0, seed=5).sequences
    )
    logits = native(Tensor(ids[:1]), Tensor(mask[:1]))[0].asnumpy()[0, -1].astype(np.float64)
    freq = np.bincount(got.responses[:, 0], minlength=logits.size) / len(got.responses)

    def tv(temp):
        p = np.exp((logits - logits.max()) / temp)
        return 0.5 * np.abs(freq - p / p.sum()).sum()

    assert tv(t) < 0.15, tv(t)
    assert tv(1.0) > 0.2  # a law the check can tell apart


def test_mindformers_engine_refusals_and_shared_weights():
    """Off Ascend the use_past engine is refused naming the key; a prompt holding the pad id is
    refused naming row and token; the use_past net builds (here too) on the policy's very
    Parameters plus a KV cache of its own, regrown for a larger batch without copying weights."""
    from mindrlhf.models.mindformers_generation import MindFormersGenerator, generator

    mf, _, _ = pair("qwen2_bias")
    with pytest.raises(RuntimeError, match="generation.engine: native"):
        MindFormersGenerator(mf)
    ids, mask = left_pad([[5, 6, 7], [8, 0, 9]], 0)
    mask[1, 1] = 1  # token 0 there is the pad id as a real token
    with pytest.raises(ValueError, match="prompt row 1, token 1"):
        mf_engine(mf, 2).generate(ids, mask, GenerationConfig(max_new_tokens=2), -1, 0)

    policy = {id(p) for p in mf.net.get_parameters()}
    for rows in (2, 5):
        eng = generator(mf, rows, use_past=True)
        held = {id(p) for p in eng.net.get_parameters()}
        assert policy <= held
        cache = [p for p in eng.net.get_parameters() if id(p) not in policy]
        assert cache and all("paged_attention_mgr" in p.name for p in cache)
        blocks = rows * -(-mf.cfg.max_seq_len // eng.BLOCK)
        assert all(p.shape[:2] == (blocks, eng.BLOCK) for p in cache), [p.shape for p in cache]
        assert eng.capacity == rows
    assert generator(mf, 3, use_past=True) is eng  # smaller batches reuse it


def test_stages_route_rollouts_through_the_configured_engine():
    """rollout sampling and greedy evaluation keep ``generation.engine`` (and ``compiled``)."""
    from mindrlhf.stages.rollout import greedy_config, rollout_config

    g = GenerationConfig(engine="mindformers", compiled=False, max_new_tokens=9, top_k=4)
    r, e = rollout_config(g, temperature=0.7), greedy_config(g, 5)
    assert (r.engine, r.compiled, r.do_sample, r.top_k, r.temperature) == (
        "mindformers",
        False,
        True,
        0,
        0.7,
    )
    assert (e.engine, e.compiled, e.do_sample, e.max_new_tokens) == ("mindformers", False, False, 5)
