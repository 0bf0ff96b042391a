"""Rollouts by MindFormers' own incremental inference (``generation.engine: mindformers``).

With ``model.backend: mindformers`` rollouts run, by default, our KV-cache generator
(models/generation.py) on the MindFormers model's Parameters. On Ascend, MindFormers' own
``generate`` with ``use_past=True`` -- its paged-attention KV cache (``ReshapeAndCache`` /
``PagedAttention``), fused ``ApplyRotaryPosEmb`` and flash-attention prefill, the path MindRLHF
samples with -- is usually the faster one at 7B scale; this engine runs it.

:class:`MindFormersGenerator` builds a second ``LlamaForCausalLM`` from the same model config
with ``use_past=True`` and rebinds every weight to the training model's Parameter (the very same
objects, as the policy wrapper's ``shared_decoder``): an optimizer step is seen by the next
rollout, nothing is copied, and the only new memory is MindFormers' KV cache (its blocks sized
``num_blocks x block_size`` from the batch and ``model.max_seq_len``).

What differs from the native generator, and how a batch crosses:

* Prompts: ours are left-padded with a mask; MindFormers' ``generate`` wants rows right-padded
  with ``pad_token_id`` and reads *any* token equal to it as padding (the valid length is the
  last non-pad position; its causal mask hides pad-valued tokens). A prompt holding the pad id
  is refused, naming the row and position, rather than generated from a different prompt.
* Responses: MindFormers returns each row's prompt and new tokens up to and including eos; they
  come back as a :class:`generation.Generation`, left-padded prompt, right-padded responses,
  the response mask 1 up to and including eos -- the layout every stage consumes.
* Sampling: MindFormers' own (temperature, top-k, top-p warpers; ``np.random.choice``), seeded
  per batch from (seed, the batch's first row id). The law is the policy's at the temperature,
  as the native engine's, so the losses' log-probs (recomputed by the scoring pass) are unchanged;
  the tokens drawn are not the native engine's, and a row's draw depends on its batch.
* Greedy: MindFormers' argmax; token for token the native engine's on the same weights.

CPU: none of MindFormers' incremental kernels exist in MindSpore 2.9's CPU build
(``ApplyRotaryPosEmb``: "kernel unregistered" in float16, "must be float16/bfloat16" in float32;
paged attention is Ascend-only), nor its generation loop's ``ArgMaxExt`` / ``TopkExt``, so the
engine is refused there (``generation.engine: native`` runs our generator on the same weights).
``use_past=False`` builds the same engine over MindFormers' full-recompute forward: that is how
the CPU tests run everything above but the cache itself (with argmax supplied by a CPU kernel).
"""

from __future__ import annotations

import copy

import numpy as np

from .generation import Generation, check_fits

CPU_REFUSAL = (
    "generation.engine: mindformers runs MindFormers' incremental inference (use_past: paged "
    "attention, ApplyRotaryPosEmb), whose kernels MindSpore {ms} has only on Ascend, not on "
    "{device}; use generation.engine: native (our KV-cache generator, on the same weights)"
)


def right_padded(prompt_ids: np.ndarray, prompt_mask: np.ndarray, pad_id: int) -> np.ndarray:
    """Left-padded (B, P) prompts as MindFormers takes them: each row's tokens first, then pad.
    A real token equal to ``pad_id`` would be read as padding there: refused."""
    b, p = prompt_ids.shape
    out = np.full((b, p), pad_id, dtype=np.int32)
    for i in range(b):
        row = prompt_ids[i][prompt_mask[i].astype(bool)]
        if not len(row):
            raise ValueError(f"prompt row {i} is empty: MindFormers' generate needs one token")
        hits = np.flatnonzero(row == pad_id)
        if len(hits):
            raise ValueError(
                f"prompt row {i}, token {int(hits[0])}: the pad id {pad_id}, which MindFormers' "
                "generate reads as padding; use generation.engine: native, or a tokenizer pad id "
                "that no prompt contains"
            )
        out[i, : len(row)] = row
    return out


def as_generation(
    outputs,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> Generation:
    """MindFormers' outputs (per row: its prompt tokens, then the new ones up to and including
    eos) as our :class:`Generation` of the left-padded prompts."""
    b, p = prompt_ids.shape
    lengths = prompt_mask.sum(1).astype(int)
    responses = []
    for i, out in enumerate(outputs):
        out = np.asarray(out, dtype=np.int32)
        if len(out) < lengths[i] or not np.array_equal(
            out[: lengths[i]], prompt_ids[i][prompt_mask[i].astype(bool)]
        ):
            raise RuntimeError(f"MindFormers' generate returned row {i} without its prompt")
        r = out[lengths[i] :]
        stop = np.flatnonzero(r == eos_id)
        if len(stop):
            r = r[: stop[0] + 1]
        if len(r) > max_new_tokens:
            raise RuntimeError(
                f"MindFormers' generate returned {len(r)} new tokens for row {i}, "
                f"max_new_tokens is {max_new_tokens}"
            )
        responses.append(r)
    steps = max(len(r) for r in responses)
    resp = np.full((b, steps), pad_id, dtype=np.int32)
    rmask = np.zeros((b, steps), dtype=np.int32)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = r
        rmask[i, : len(r)] = 1
    seq = np.concatenate([prompt_ids.astype(np.int32), resp], 1)
    mask = np.concatenate([prompt_mask.astype(np.int32), rmask], 1)
    return Generation(seq, mask, rmask, p)


def batch_seed(seed: int, row_ids) -> int:
    """MindFormers draws from NumPy's global stream: one seed per batch, from the stage's seed and
    the batch's first row id (so data-parallel ranks and successive batches differ)."""
    first = 0 if row_ids is None else int(next(iter(row_ids)))
    return int(np.random.SeedSequence([seed, first]).generate_state(1)[0])


class MindFormersGenerator:
    """MindFormers' ``generate`` on a :class:`MindFormersCausalLM`'s weights (see the module
    docstring), for batches of up to ``capacity`` rows. ``use_past``: None = MindFormers' KV
    cache, refused off Ascend; False = its full-recompute forward, the same engine without the
    cache (what runs on CPU)."""

    BLOCK = 16  # tokens per block of MindFormers' paged KV cache

    def __init__(self, model, use_past: bool | None = None, capacity: int = 1):
        import mindspore as ms

        from .mindformers_backend import import_mindformers

        device = ms.get_context("device_target")
        if use_past is None:
            if device != "Ascend":
                raise RuntimeError(CPU_REFUSAL.format(ms=ms.__version__, device=device))
            use_past = True
        import_mindformers()
        from mindformers import LlamaForCausalLM

        self.model, self.use_past, self.capacity = model, use_past, capacity
        # the training net's own config (device flags, parallel_config), with MindFormers' cache
        mf_cfg = copy.deepcopy(model.net.config)
        mf_cfg.use_past = use_past
        mf_cfg.block_size = self.BLOCK
        mf_cfg.num_blocks = capacity * -(-model.cfg.max_seq_len // self.BLOCK)
        self.net = _lazy_net(LlamaForCausalLM, mf_cfg)
        theirs = dict(model.net.parameters_and_names())
        # every cell's reference to a weight goes to the policy's Parameter: tied embeddings
        # (lm_head.weight is the embedding table) are one Parameter held by two cells
        swap = {
            id(mine): theirs[name]
            for name, mine in self.net.parameters_and_names()
            if name in theirs
        }
        for _, cell in self.net.cells_and_names():
            for attr, param in list(cell._params.items()):
                if id(param) in swap:
                    setattr(cell, attr, swap[id(param)])
        shared = {id(p) for p in theirs.values()}
        if not shared <= {id(p) for p in self.net.get_parameters()}:
            raise RuntimeError("MindFormers' inference net does not hold every policy weight")
        for param in self.net.get_parameters():  # its KV cache: allocated now, not at first use
            if id(param) not in shared and param.has_init:
                param.init_data()
        self.net.set_train(False)

    def generate(
        self, prompt_ids, prompt_mask, gen, eos_id: int, pad_id: int, seed: int = 0, row_ids=None
    ) -> Generation:
        b, p = prompt_ids.shape
        n = gen.max_new_tokens
        check_fits(self.model.cfg, p, n)
        ids = right_padded(prompt_ids, prompt_mask, pad_id)
        if b > self.capacity:
            raise ValueError(f"a batch of {b} rows in a generator built for {self.capacity}")
        sampling = dict(do_sample=False)
        if gen.do_sample:  # a warper only where it filters: top_p 1.0 would still sort the vocab
            sampling = dict(
                do_sample=True,
                temperature=gen.temperature,
                top_k=gen.top_k or None,
                top_p=gen.top_p if gen.top_p < 1.0 else None,
            )
        outputs = self.net.generate(
            ids,
            max_new_tokens=n,
            eos_token_id=[eos_id],
            pad_token_id=pad_id,
            repetition_penalty=1.0,
            min_new_tokens=0,
            seed=batch_seed(seed, row_ids),
            **sampling,
        )
        return as_generation(outputs, prompt_ids, prompt_mask, n, eos_id, pad_id)


def _lazy_net(cls, mf_cfg):
    """The inference net without initialising weights it will share anyway (MindSpore's
    ``no_init_parameters``, where the version has it)."""
    try:
        from mindspore.nn.utils import no_init_parameters
    except ImportError:
        return cls(mf_cfg)
    with no_init_parameters():
        return cls(mf_cfg)


def generator(model, batch: int, use_past: bool | None = None) -> MindFormersGenerator:
    """The model's MindFormers generator, built on first use and kept on it; rebuilt (weights
    still shared, a larger KV cache) for a batch larger than it was built for."""
    g = model.__dict__.get("_mf_generator")
    stale = g is not None and use_past is not None and g.use_past != use_past
    if g is None or stale or batch > g.capacity:
        g = MindFormersGenerator(model, use_past, capacity=max(batch, g.capacity if g else 1))
        object.__setattr__(model, "_mf_generator", g)
    return g
