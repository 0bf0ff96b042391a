"""LoRA (models/lora.py): the adapted forward is W + (alpha / r) B A (checked against NumPy), it
starts as the base, a training step moves only the adapters, the reference is the base's own
weights with adapters off, adapter checkpoints are small artifacts whose parent is their base,
export merges them (transformers loads it with our logits), and a killed LoRA stage resumes to the
same artifact ids. Every tiny model gets non-trivial weights (conftest.randomize)."""

import dataclasses
import signal

import numpy as np
import pytest
from mindspore import Tensor

from conftest import assert_config_rejects, randomize, tiny_full_overrides, tiny_model_cfg
from mindrlhf.algos.sft import sft_loss
from mindrlhf.config import LoraConfig, OptimConfig, from_dict, load_config
from mindrlhf.models import lora
from mindrlhf.models.decoder import CausalLM, load_state_dict, state_dict
from mindrlhf.runtime import Dist
from mindrlhf.stages.common import Trainer

ALL = ["q", "k", "v", "o", "gate", "up", "down"]
# alpha != rank: a scale of alpha, rank / alpha or 1 instead of alpha / rank shows
LC = LoraConfig(rank=3, alpha=4.5, targets=ALL)
FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama": dict(family="llama", tie_embeddings=False, qkv_bias=True),
}


def targets_of(family):
    return [t for t in ALL if not (family == "gpt2" and t == "gate")]


def wrapped(family, seed=0, adapters=True, **lc):
    """(base CausalLM with random non-trivial weights, its weights, the LoRA model over it with
    random non-zero adapters unless ``adapters`` is False)."""
    cfg = tiny_model_cfg(**FAMILIES[family])
    base = CausalLM(cfg, seed=seed)
    w = randomize(base, seed=seed + 1, qk_scale=3.0)
    lcfg = dataclasses.replace(LC, targets=targets_of(family), **lc)
    model = lora.wrap(base, lcfg, seed=seed, base="b" * 64)
    if adapters:
        r = np.random.default_rng(seed + 2)
        ad = {n: r.normal(0.0, 0.3, v.shape).astype(np.float32) for n, v in saved(model).items()}
        lora.load_saved_state(model, ad, "test")
    return base, w, model


def saved(model):
    return lora.saved_state(model)


def logits(model, ids):
    return model(Tensor(ids), Tensor(np.ones_like(ids)))[0].asnumpy()


def numpy_merge(w, ad, alpha, rank):
    """The merged weights written out independently of models/lora.py."""
    out = dict(w)
    for name, a in ad.items():
        if name.endswith(lora.A):
            stem = name[: -len(lora.A)]
            b = ad[stem + lora.B]
            out[stem + ".weight"] = w[stem + ".weight"] + (alpha / rank) * np.einsum(
                "or,ri->oi", b.astype(np.float64), a.astype(np.float64)
            )
    return out


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,key",
    [
        ("model: {lora: {rank: 0}}", "model.lora.rank"),
        ("model: {lora: {alpha: -1}}", "model.lora.alpha"),
        ("model: {lora: {dropout: 1.0}}", "model.lora.dropout"),
        ("model: {lora: {targets: [q, qq]}}", "model.lora.targets"),
        ("model: {lora: {targets: []}}", "model.lora.targets"),
        ("model: {lora: {rnak: 4}}", "model.lora.rnak"),
        ("model: {family: gpt2, lora: {targets: [q, gate]}}", "model.lora.targets"),
        ("model: {lora: {rank: 4}}", "model.lora"),  # no pretrained weights to adapt
    ],
)
def test_bad_lora_config_names_the_key(tmp_path, text, key):
    assert_config_rejects(tmp_path, text, key)


def test_lora_off_changes_nothing_and_is_in_the_stage_key(tmp_path):
    from mindrlhf.keys import stage_key
    from mindrlhf.stages.common import model_meta

    off = load_config("demo")
    assert off.model.lora is None
    assert "lora" not in off.to_dict()["model"]  # manifests and keys as before LoRA existed
    on = from_dict({"model": {"init": "artifact:x", "lora": {"rank": 4}}})
    assert on.model.lora == LoraConfig(rank=4)
    other = from_dict({"model": {"init": "artifact:x", "lora": {"rank": 8}}})
    plain = from_dict({"model": {"init": "artifact:x"}})
    keys = {stage_key("sft", c.to_dict(), {"train": "t"}) for c in (on, other, plain)}
    assert len(keys) == 3
    # the base weights an import writes do not depend on how they will be trained
    assert stage_key("import_weights", on.to_dict(), {}) == stage_key(
        "import_weights", plain.to_dict(), {}
    )
    assert model_meta(on) == model_meta(plain)


def test_preflight_counts_adapters_and_their_moments_only():
    from mindrlhf.preflight import estimate_memory, lora_param_count

    base, _, model = wrapped("llama", adapters=False)
    section = {**model_section(base.cfg), "init": "artifact:x"}
    lcd = dataclasses.asdict(LC)
    assert lora_param_count(dataclasses.replace(base.cfg, lora=LC)) == sum(
        v.size for v in saved(model).values()
    )
    full, adapted = from_dict({"model": section}), from_dict({"model": {**section, "lora": lcd}})
    for stage in ("sft", "ppo", "grpo", "dpo"):
        assert estimate_memory(adapted, stage).weights < estimate_memory(full, stage).weights
    assert estimate_memory(adapted, "reflogp").weights == estimate_memory(full, "reflogp").weights


# ---- the adapted model ------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_weights_are_w_plus_scaled_ba_and_give_the_lora_logits(family, rng):
    base, w, model = wrapped(family)
    ad = saved(model)
    assert sorted(ad) == sorted(
        f"model.layers.{i}.{lora_path}{x}"
        for i in range(base.cfg.n_layers)
        for lora_path in (
            {
                "q": "attn.q_proj",
                "k": "attn.k_proj",
                "v": "attn.v_proj",
                "o": "attn.o_proj",
                "gate": "mlp.gate_proj",
                "up": "mlp.up_proj",
                "down": "mlp.down_proj",
            }[t]
            for t in targets_of(family)
        )
        for x in (lora.A, lora.B)
    )
    merged = lora.merge(w, ad, lora.checkpoint_meta(model)["lora"], "test")
    want = numpy_merge(w, ad, LC.alpha, LC.rank)
    assert sorted(merged) == sorted(w)
    for k in w:
        np.testing.assert_allclose(merged[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # the LoRA forward is the merged model's forward
    plain = CausalLM(base.cfg, seed=9)
    load_state_dict(plain, merged)
    ids = rng.integers(0, base.cfg.vocab_size, (2, 11)).astype(np.int32)
    np.testing.assert_allclose(logits(model, ids), logits(plain, ids), rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits(model, ids), logits(base, ids), atol=1e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_at_init_the_lora_model_is_the_base(family, rng):
    base, w, model = wrapped(family, adapters=False)
    ids = rng.integers(0, base.cfg.vocab_size, (2, 11)).astype(np.int32)
    ref = CausalLM(base.cfg, seed=5)
    load_state_dict(ref, w)
    np.testing.assert_array_equal(logits(model, ids), logits(ref, ids))
    ad = saved(model)
    for k, v in ad.items():
        if k.endswith(lora.B):
            assert not v.any(), k
        else:  # A as PEFT draws it: uniform in +-1/sqrt(in)
            bound = 1 / np.sqrt(v.shape[1])
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.5 * bound, k
    # the parameter names of the base are kept (checkpoints and export read them)
    names = dict(model.parameters_and_names())
    assert set(w) <= set(names) and set(names) - set(w) == set(ad)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_training_step_moves_only_the_adapters(compiled, rng):
    base, w, model = wrapped("llama", adapters=False)
    model.set_train(True)

    def loss_fn(ids, am, lm, denom):
        out, _ = model(ids, am)
        loss = sft_loss(out, ids, lm, denom)
        return loss, loss

    params = model.trainable_params()
    t = Trainer(params, loss_fn, OptimConfig(lr=1e-2, compiled=compiled), Dist(), 10)
    assert sorted(p.name for p in params) == sorted(saved(model))  # the optimizer's whole list
    before = {k: v.copy() for k, v in saved(model).items()}  # asnumpy() may share storage
    ids = rng.integers(4, base.cfg.vocab_size, (4, 12)).astype(np.int32)
    am, lm = np.ones_like(ids), np.ones(ids.shape, np.float32)
    for _ in range(3):  # B moves at step 1; A only once B is not zero
        t.step(Tensor(ids), Tensor(am), Tensor(lm), Tensor(np.float32(lm[:, 1:].sum())))
    now = state_dict(model)
    for k, v in w.items():
        np.testing.assert_array_equal(now[k], v, err_msg=f"base weight {k} changed")
    for k, v in saved(model).items():
        assert not np.array_equal(v, before[k]), f"adapter {k} did not train"
    moments = t.optimizer_state()
    adapter_size = sum(v.size for v in before.values())
    assert sum(v.size for k, v in moments.items() if k != "global_step") == 2 * adapter_size


def test_the_reference_is_the_base_weights_with_adapters_off(rng):
    base, w, model = wrapped("llama")
    ref = lora.base_of(model)
    assert ref is base
    ids = rng.integers(0, base.cfg.vocab_size, (2, 11)).astype(np.int32)
    fresh = CausalLM(base.cfg, seed=7)
    load_state_dict(fresh, w)
    np.testing.assert_array_equal(logits(ref, ids), logits(fresh, ids))
    assert not np.allclose(logits(model, ids), logits(ref, ids), atol=1e-3)
    # no second copy: every base weight is one Parameter object shared by both models
    mine = dict(model.parameters_and_names())
    for name, p in ref.parameters_and_names():
        assert mine[name] is p, name
    assert lora.base_of(base) is None and not lora.is_wrapped(base)


def test_the_lora_model_decodes_with_the_compiled_cache(rng):
    """Generation reaches the adapters on both paths (prompt forward, compiled decode step)."""
    from mindrlhf.config import GenerationConfig
    from mindrlhf.models.generation import generate, left_pad

    base, w, model = wrapped("llama")
    plain = CausalLM(base.cfg, seed=2)
    load_state_dict(plain, lora.merge(w, saved(model), lora.checkpoint_meta(model)["lora"], "t"))
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12]], 0)
    gen = GenerationConfig(max_new_tokens=6, do_sample=False, compiled=True)
    a = generate(model, ids, mask, gen, eos_id=1, pad_id=0)
    b = generate(plain, ids, mask, gen, eos_id=1, pad_id=0)
    np.testing.assert_array_equal(a.sequences, b.sequences)


# ---- artifacts and export ---------------------------------------------------------------------


def model_section(cfg):
    d = dataclasses.asdict(cfg)
    d.pop("lora")
    return d


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_artifact_is_small_has_its_base_as_parent_and_exports_merged(
    family, store, tmp_path, rng
):
    torch = pytest.importorskip("torch")
    import transformers

    from mindrlhf.cli import main

    base, w, _ = wrapped(family)
    base_art = store.write_checkpoint(
        w, name="t-base", meta={"stage": "import", "model": model_section(base.cfg)}
    )
    model = lora.wrap(base, dataclasses.replace(LC, targets=["q", "v"]), 0, base_art.id)
    r = np.random.default_rng(3)
    lora.load_saved_state(
        model,
        {n: r.normal(0, 0.3, v.shape).astype(np.float32) for n, v in saved(model).items()},
        "t",
    )
    art = store.write_checkpoint(
        saved(model),
        name="t-sft",
        parents=[base_art.id],
        meta={"stage": "sft", "model": model_section(base.cfg), **lora.checkpoint_meta(model)},
    )
    assert art.parents == [base_art.id] and art.meta["lora"]["base"] == base_art.id
    assert set(store.read_checkpoint(art.id)) == set(saved(model))
    size = {a.id: (a.path / "model.safetensors").stat().st_size for a in (art, base_art)}
    assert size[art.id] < 0.2 * size[base_art.id], size
    # read back whole: the base with the adapters merged
    full = lora.read_weights(store, art.id)
    want = numpy_merge(w, saved(model), LC.alpha, LC.rank)
    assert sorted(full) == sorted(w)
    for k in w:
        np.testing.assert_allclose(full[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # export merges; transformers computes the LoRA model's logits
    out = tmp_path / "hf"
    assert main(["export", art.id, "--out", str(out), "--store", str(store.root)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    hf.eval()
    ids = rng.integers(0, base.cfg.vocab_size, (2, 9)).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits(model, ids), theirs, atol=2e-4, rtol=1e-3)


def test_adapters_of_a_missing_projection_are_refused(store):
    w = {"model.layers.0.attn.q_proj.weight": np.zeros((4, 4), np.float32)}
    info = {"rank": 2, "alpha": 2.0, "base": "x"}
    bad = {
        "model.layers.0.attn.k_proj" + lora.A: np.zeros((2, 4), np.float32),
        "model.layers.0.attn.k_proj" + lora.B: np.zeros((4, 2), np.float32),
    }
    with pytest.raises(ValueError, match="k_proj.weight"):
        lora.merge(w, bad, info, "adapter checkpoint x")


# ---- stages -----------------------------------------------------------------------------------


def lora_chain(tiny_chain, **sections):
    """The tiny chain's config with LoRA on, its SFT checkpoint as the base (model.init)."""
    root = tiny_chain.root
    over = tiny_full_overrides(root)
    over["model"].update(
        init=f"artifact:{tiny_chain.sft}", lora={"rank": 2, "alpha": 4.0, "targets": ALL[:4]}
    )
    for k, v in sections.items():
        over[k].update(v)
    return load_config("demo", over)


def stage_inputs(tiny_chain, stage):
    """The stage's tiny-chain inputs; LoRA's SFT starts from the chain's SFT weights (its base)."""
    extra = {"init": tiny_chain.sft} if stage == "sft" else {}
    return {**tiny_chain.inputs[stage], **extra}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_every_training_stage_writes_adapters_on_its_base(tiny_chain, tmp_path, stage):
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage
    from mindrlhf.models.decoder import ScalarHeadModel

    sections = {}
    if stage == "grpo":  # a reward that differs within a group, so advantages are never all 0
        (tmp_path / "r.py").write_text(
            "def length(prompts, completions, **_):\n"
            "    return [len(c) / 10.0 for c in completions]\n"
        )
        sections["grpo"] = {"reward": f"python:{tmp_path / 'r.py'}:length"}
    cfg = lora_chain(tiny_chain, **sections)
    inputs = stage_inputs(tiny_chain, stage)
    res = run_stage(stage, cfg, inputs, tiny_chain.root, tmp_path / stage, log=lambda s: None)
    store = ArtifactStore(tiny_chain.root)
    art = store.get(res["outputs"]["checkpoint"])
    base = tiny_chain.sft
    assert art.meta["lora"]["base"] == base and base in art.parents
    tensors = store.read_checkpoint(art.id)
    extra = {k for k in tensors if not k.endswith((lora.A, lora.B))}
    assert extra == ({"score.weight", "score.bias"} if stage == "rm" else set())
    assert all(".attn." in k for k in tensors if k not in extra)  # targets q, k, v, o
    full = lora.read_weights(store, art.id)
    model = (ScalarHeadModel if stage == "rm" else CausalLM)(cfg.model, seed=0)
    load_state_dict(model, full)  # every tensor of the model, merged
    sft = store.read_checkpoint(base)
    changed = [k for k in sft if k in full and not np.array_equal(sft[k], full[k])]
    assert changed and all(k.endswith(".weight") and ".attn." in k for k in changed), changed


@pytest.mark.slow
def test_a_killed_lora_sft_resumes_to_the_same_ids(tiny_chain, tmp_path):
    from mindrlhf.launch import StageFailed, run_stage
    from mindrlhf.stages.common import KILL_AFTER_CKPT

    cfg = lora_chain(tiny_chain, sft={"steps": 7, "ckpt_every": 3, "warmup_steps": 4})
    inputs = stage_inputs(tiny_chain, "sft")
    quiet = dict(log=lambda s: None)
    clean = run_stage("sft", cfg, inputs, tiny_chain.root, tmp_path / "clean", **quiet)
    crash = tmp_path / "crash"
    with pytest.raises(StageFailed) as e:
        run_stage("sft", cfg, inputs, tiny_chain.root, crash, env={KILL_AFTER_CKPT: "3"}, **quiet)
    assert e.value.returncode == -signal.SIGKILL
    # the working checkpoint holds the adapters and their moments, not the model
    from safetensors.numpy import load_file

    kept = load_file(str(crash / "ckpt-3" / "model.safetensors"))
    assert kept and all(k.endswith((lora.A, lora.B)) for k in kept)
    lines = []
    resumed = run_stage("sft", cfg, inputs, tiny_chain.root, crash, log=lines.append)
    assert any("resuming from step 3" in ln for ln in lines), "the rerun did not resume"
    assert resumed["outputs"] == clean["outputs"]
