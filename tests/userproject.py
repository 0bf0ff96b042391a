"""A "user project" outside the repository, as a new user would bring one: a small random Qwen2
model written by transformers (bf16, sharded safetensors with an index), a tokenizer.json trained
with the tokenizers library and a tokenizer_config.json with Qwen2's ChatML template, chat SFT
data in JSONL, preference pairs in Parquet under the user's own column names, math prompts with
answers in JSONL, a reward.py with two reward functions, and a config that names them all by
relative paths.

    .venv/bin/python tests/userproject.py DIR      # writes the project into DIR
    .venv/bin/mindrlhf run DIR/project.yaml         # from any directory

The end-to-end test (tests/test_user_project.py) and the README's worked example use it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

REWARD_PY = '''"""Reward functions for GRPO and online DPO.

fn(prompts, completions, **columns) -> list[float]
"""


def correct(prompts, completions, answer, **columns):
    """1 when the completion's first number is the answer."""
    out = []
    for completion, a in zip(completions, answer):
        words = completion.replace("=", " ").split()
        nums = [w.strip(".,") for w in words if w.strip(".,").lstrip("-").isdigit()]
        out.append(1.0 if nums and nums[0] == str(a) else 0.0)
    return out


def brevity(prompts, completions, **columns):
    """A little for short answers."""
    return [-len(c) / 100.0 for c in completions]
'''

CONFIG = """# Your own model and data: every path is relative to this file.
name: mine
seed: 7
store:
  root: artifacts
model:
  init: hf:model    # sizes, rope theta, norm eps, tied embeddings: from model/config.json
  max_seq_len: 96             # lower than the model's 128 positions: allowed
data:
  recipes: []
  heldout_fraction: 0.25
  max_prompt_len: 40
  max_len: 72
  sources:
    - {kind: sft, path: data/chats.jsonl, format: chat}
    - kind: pairs
      path: data/prefs.parquet
      fields: {prompt: question, chosen: good, rejected: bad}
    - {kind: prompts, path: data/math.jsonl, name: math, fields: {prompt: q, answer: a}}
pipeline:
  stages: [prepare, sft, rm, ppo, grpo, dpo, online_dpo]
# a few steps of a small model: eager steps and decoding (compiling per shape would cost more)
sft: {steps: 6, batch_size: 4, ckpt_every: 3, log_every: 2, eval_batches: 1, lr: 0.001,
      compiled: false}
rm: {steps: 4, batch_size: 4, ckpt_every: 2, log_every: 2, compiled: false}
ppo: {prompts: math, iterations: 2, rollout_batch: 4, mini_batch: 2, ppo_epochs: 1, ckpt_every: 1,
      eval_prompts: 4, compiled: false}
grpo:
  prompts: math
  reward: [python:reward.py:correct, python:reward.py:brevity]
  reward_weights: [1.0, 0.1]
  iterations: 2
  prompts_per_iter: 2
  group_size: 2
  mini_batch: 4
  max_new_tokens: 8
  ckpt_every: 1
  eval_prompts: 4
  compiled: false
dpo: {steps: 4, batch_size: 4, ckpt_every: 2, log_every: 2, compiled: false}
online_dpo:
  prompts: math
  judge: [python:reward.py:correct, python:reward.py:brevity]   # ranks each sampled pair
  rounds: 2
  prompts_per_round: 4
  steps_per_round: 2
  eval_prompts: 4
generation: {max_new_tokens: 8, compiled: false}
"""

TOPICS = [
    "the weather",
    "a good book",
    "cooking rice",
    "learning to swim",
    "a quiet train station",
    "planting tomatoes",
    "a broken bicycle",
    "the night sky",
    "making tea",
    "an old photograph",
]


def rows(seed: int = 0):
    rnd = random.Random(seed)
    chats, prefs, math = [], [], []
    for i in range(40):
        t = TOPICS[i % len(TOPICS)]
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me about {t}, please ({i})."},
                    {
                        "role": "assistant",
                        "content": f"Here is a short note about {t}: it is nice.",
                    },
                ]
            }
        )
        prefs.append(
            {
                "question": f"What do you think of {t}? ({i})",
                "good": f"I like {t} a lot.",
                "bad": f"{t} is bad and dull {i}.",
            }
        )
        a, b = rnd.randint(1, 9), rnd.randint(1, 9)
        math.append({"q": f"What is {a} + {b}?", "a": a + b})
    return chats, prefs, math


def write_project(d: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    d = Path(d)
    (d / "model").mkdir(parents=True, exist_ok=True)
    (d / "data").mkdir(exist_ok=True)
    chats, prefs, math = rows()
    corpus = [json.dumps(r) for r in chats + prefs + math] + [
        "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18"
    ]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        corpus,
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    tok.save(str(d / "model" / "tokenizer.json"))
    (d / "model" / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": QWEN2_TEMPLATE,
            },
            indent=1,
        )
    )
    cfg = transformers.Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.rand(p.shape) + 0.5
                if name.endswith("norm.weight")
                else torch.randn(p.shape) * 0.05
            )
    model.to(torch.bfloat16).save_pretrained(d / "model", max_shard_size="40KB")
    with open(d / "data" / "chats.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in chats)
    pq.write_table(pa.Table.from_pylist(prefs), d / "data" / "prefs.parquet")
    with open(d / "data" / "math.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in math)
    (d / "reward.py").write_text(REWARD_PY)
    (d / "project.yaml").write_text(CONFIG)
    return d / "project.yaml"


if __name__ == "__main__":
    print(write_project(sys.argv[1] if len(sys.argv) > 1 else "my-project"))
