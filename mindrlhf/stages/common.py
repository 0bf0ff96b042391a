"""What every stage process shares: the spec it is given, logging, working checkpoints for resume,
and a trainer that owns the optimizer, gradient clipping, data-parallel reduction and NaN checks.

A stage is launched as ``python -m mindrlhf.stages.<name> --spec spec.json --out result.json``
(or the same file under ``msrun``). The spec holds the full config, the input artifact ids, the
store root and the run directory where working checkpoints live between retries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Config, OptimConfig, from_dict
from ..data.store import ArtifactStore, atomic_write_bytes, drop_dir, fsync_dir
from ..graphs import POOL
from ..runtime import Dist, init_runtime

KILL_AFTER_CKPT = (
    "MINDRLHF_KILL_AFTER_CKPT"  # tests: the stage SIGKILLs itself once this step is saved
)


class NumericalError(RuntimeError):
    """Loss, gradient or reward became NaN/inf; the last good checkpoint is kept."""


@dataclass
class StageContext:
    name: str
    cfg: Config
    inputs: dict
    store: ArtifactStore
    run_dir: Path
    dist: Dist
    out: Path
    spec: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        """The stage key of this computation (keys.stage_key): working checkpoints carry it."""
        from ..keys import stage_key

        return stage_key(self.name, self.spec["config"], self.inputs)

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[{self.name}] {msg}", flush=True)

    def metric(self, **kv) -> None:
        """One JSON line per logging step; the Prefect task parses these into run metrics."""
        if self.dist.is_main:
            kv = {
                k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v)
                for k, v in kv.items()
            }
            print("METRIC " + json.dumps({"stage": self.name, **kv}), flush=True)

    def alarm(self, kind: str, **figures) -> None:
        """An ALARM line: the Prefect task makes it the event ``mindrlhf.<kind>.suspected``."""
        if self.dist.is_main:
            self.log(
                f"ALARM {kind}: "
                + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in figures.items()
                )
            )
            print("ALARM " + json.dumps({"stage": self.name, "kind": kind, **figures}), flush=True)

    def finish(self, outputs: dict, metrics: dict, **extra) -> None:
        if not self.dist.is_main:
            return
        result = {
            "stage": self.name,
            "outputs": outputs,
            "metrics": metrics,
            "seconds": round(time.time() - self.t0, 2),
            "graphs": POOL.stats(),
            **extra,
        }
        atomic_write_bytes(self.out, json.dumps(result, indent=1, default=float).encode())
        self.log(f"done in {result['seconds']}s -> {outputs}")


def model_meta(cfg: Config) -> dict:
    """The model section as a manifest records it: user files by their sha256 (keys.content_keyed),
    not their path, so the same weights reached another way give the same artifact ids. Without
    ``lora``: that is how a model was trained, not what it is (an adapter checkpoint records its
    settings under ``meta["lora"]``, models/lora.py)."""
    from ..keys import content_keyed

    model = {k: v for k, v in cfg.to_dict()["model"].items() if k != "lora"}
    return content_keyed({"model": model})["model"]


def start_stage(name: str, argv: list[str] | None = None, mindspore: bool = True) -> StageContext:
    ap = argparse.ArgumentParser(prog=f"mindrlhf.stages.{name}")
    ap.add_argument("--spec", required=True, help="JSON with config, inputs, store_root, run_dir")
    ap.add_argument("--out", required=True, help="where to write the result JSON")
    args = ap.parse_args(argv)
    from ..launch import watch_launcher

    watch_launcher()  # exit with the launcher rather than outlive it
    spec = json.loads(Path(args.spec).read_text())
    cfg = from_dict(spec["config"], spec.get("config_source", args.spec))
    dist = init_runtime(cfg.device_target, cfg.seed, cfg.parallel) if mindspore else Dist()
    from ..graphs import configure_from
    from ..preflight import host_memory_bytes

    configure_from(
        cfg.resources, host_memory_bytes(cfg), log=lambda s: print(f"[{name}] {s}", flush=True)
    )
    section = getattr(cfg, {"online_dpo": "dpo"}.get(name, name), None)
    if mindspore and getattr(section, "layer_graphs", False):
        from ..models import decoder

        decoder.LAYER_GRAPHS = True  # the models this stage builds (config.OptimConfig)
        decoder.LAYER_SPAN = section.layer_graph_span
        decoder.LAYER_PAD = section.layer_graph_pad
        print(
            f"[{name}] layer graphs: up to {section.layer_graph_span} decoder layers a compiled "
            "graph, in training steps and out of them; lengths padded to a multiple of "
            f"{section.layer_graph_pad}",
            flush=True,
        )
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        name,
        cfg,
        spec.get("inputs", {}),
        ArtifactStore(spec["store_root"]),
        run_dir,
        dist,
        Path(args.out),
        spec,
    )
    # every rank says which code it runs (msrun starts workers as scripts; see launch.stage_env)
    print(
        f"[{name}] rank {dist.rank}/{dist.size} pid {os.getpid()} run_dir {run_dir} "
        f"code {Path(__file__).resolve().parents[1]}",
        flush=True,
    )
    if dist.is_main:
        swept = ctx.store.sweep_tmp()
        if swept:
            ctx.log(
                f"removed {len(swept)} staging director(ies) left by killed writers: "
                f"{', '.join(swept[:5])}"
            )
    return ctx


def stage_main(name: str, run, mindspore: bool = True) -> None:
    """Run ``run(ctx)``; a known failure exits non-zero with one clear line on stderr."""
    from ..data.schema import DataError
    from ..rewards import RewardError

    ctx = start_stage(name, mindspore=mindspore)
    try:
        run(ctx)
    except NumericalError as e:
        print(f"[{name}] numerical error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except RewardError as e:
        print(
            f"[{name}] reward error: {e}; the last good checkpoint is kept",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(4)
    except DataError as e:
        print(f"[{name}] bad data: {e}", file=sys.stderr, flush=True)
        sys.exit(5)


# ---- working checkpoints --------------------------------------------------------------------


class RunCheckpoints:
    """``run_dir/ckpt-<step>/`` directories, each complete or absent (staged and renamed)."""

    def __init__(self, run_dir: Path, key: str = "", keep: int = 2):
        self.dir = Path(run_dir)
        self.key = key  # only checkpoints written by the same computation are resumed from
        self.keep = keep
        self.foreign: set[str] = set()
        self.sweep()

    def sweep(self) -> None:
        """Temporaries of an attempt that died while writing or dropping a checkpoint (ENOSPC,
        kill -9). The run directory has one owner at a time (launch.run_dir_lock): they are ours."""
        for p in [*self.dir.glob(".tmp-ckpt-*"), *self.dir.glob(".trash-*")]:
            shutil.rmtree(p, ignore_errors=True)

    def steps(self) -> list[int]:
        out = []
        for p in self.dir.glob("ckpt-*"):
            try:
                step = int(p.name.split("-", 1)[1])
                key = json.loads((p / "state.json").read_text()).get("key", "")
            except (ValueError, OSError):
                continue
            if key == self.key:
                out.append(step)
            elif p.name not in self.foreign:
                self.foreign.add(p.name)
                print(
                    f"ignoring {p}: written by another configuration or code version",
                    file=sys.stderr,
                    flush=True,
                )
        return sorted(out)

    def save(self, step: int, files: dict[str, dict[str, np.ndarray]], state: dict) -> Path:
        from safetensors.numpy import save_file

        tmp = self.dir / f".tmp-ckpt-{step}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for stem, tensors in files.items():
                save_file(
                    {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                    str(tmp / f"{stem}.safetensors"),
                )
                with open(tmp / f"{stem}.safetensors", "rb+") as fh:
                    os.fsync(fh.fileno())
            atomic_write_bytes(
                tmp / "state.json",
                json.dumps({"step": step, "key": self.key, **state}, default=float).encode(),
            )
        except BaseException:  # disk full, interrupted: no half checkpoint stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        dest = self.dir / f"ckpt-{step}"
        if dest.exists():
            drop_dir(dest)
        os.rename(tmp, dest)
        fsync_dir(self.dir)
        for old in self.steps()[: -self.keep]:
            drop_dir(self.dir / f"ckpt-{old}")
        if os.environ.get(KILL_AFTER_CKPT) == str(step):  # fault injection for the resume tests
            os.kill(os.getpid(), signal.SIGKILL)
        return dest

    def latest(self) -> tuple[int, Path] | None:
        s = self.steps()
        return (s[-1], self.dir / f"ckpt-{s[-1]}") if s else None

    @staticmethod
    def load(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
        from safetensors.numpy import load_file

        files = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
        return files, json.loads((path / "state.json").read_text())


def save_training_state(
    ckpts: RunCheckpoints, step: int, models: dict, trainers: dict, state: dict
) -> Path:
    """Weights of every model (a LoRA model's adapters) and moments of every optimizer, plus JSON
    state, as one checkpoint."""
    from ..models.lora import saved_state

    files = {name: saved_state(m) for name, m in models.items()}
    files.update({f"{name}_optim": t.optimizer_state() for name, t in trainers.items()})
    steps = {name: t.step_num for name, t in trainers.items()}
    return ckpts.save(step, files, {**state, "trainer_steps": steps})


def resume_training_state(
    ctx: "StageContext", ckpts: RunCheckpoints, models: dict, trainers: dict
) -> tuple[int, dict]:
    """Load the newest working checkpoint, if any; returns (step, saved JSON state)."""
    latest = ckpts.latest()
    if latest is None:
        return 0, {}
    files, state = ckpts.load(latest[1])
    apply_training_state(files, state, models, trainers, str(latest[1]))
    ctx.log(f"resuming from step {state['step']} ({latest[1]})")
    return state["step"], state


def apply_training_state(files: dict, state: dict, models: dict, trainers: dict, source: str):
    from ..models.lora import load_saved_state

    for name, m in models.items():
        load_saved_state(m, files[name], source=source)
    for name, t in trainers.items():
        t.load_optimizer_state(files[f"{name}_optim"])
        t.step_num = state["trainer_steps"][name]


# ---- a loop in chained tasks: its whole training state as a store artifact -----------------------


def write_state_artifact(
    ctx: "StageContext",
    step: int,
    models: dict,
    trainers: dict,
    state: dict,
    parents: list[str],
    carry: dict | None = None,
):
    """Everything a later chunk of this loop needs to go on exactly as if it had never stopped
    (weights and optimizer moments of every model, trainer step counts, the JSON state, and
    ``carry``: other named tensor sets, e.g. the best-gold policy so far) as one checkpoint
    artifact ``<name>-<stage>-state-<step>``, named tensors ``<part>/<tensor>``."""
    from ..models.lora import saved_state

    files = {name: saved_state(m) for name, m in models.items()}
    files.update({f"{name}_optim": t.optimizer_state() for name, t in trainers.items()})
    files.update(carry or {})
    tensors = {f"{part}/{k}": v for part, ts in files.items() for k, v in ts.items()}
    steps = {name: t.step_num for name, t in trainers.items()}
    return ctx.store.write_checkpoint(
        tensors,
        name=f"{ctx.cfg.name}-{ctx.name}-state-{step}",
        parents=parents,
        meta={
            "stage": ctx.name,
            "kind": "training_state",
            "model": model_meta(ctx.cfg),
            "state": {**state, "step": step, "trainer_steps": steps},
        },
    )


def start_chunk(ctx, section, ckpts: RunCheckpoints, models: dict, trainers: dict):
    """Where an RL loop's task starts: (first, end, start, state). ``section.span`` is this task's
    ``[first, end)`` (empty: the whole loop); ``start`` the iteration its state is at: a working
    checkpoint of this task, else -- for a chunk after the first -- the training state the chunk
    before wrote (input ``state``)."""
    name = ctx.name
    first, end = section.span or (0, section.iterations)
    start, state = resume_training_state(ctx, ckpts, models, trainers)
    if start == 0 and first > 0:
        if not ctx.inputs.get("state"):
            raise ValueError(
                f"{name}.span {section.span}: a chunk after the first needs input 'state'"
            )
        start, state = load_state_artifact(ctx, ctx.inputs["state"], models, trainers)
    if start < first or start > end:
        raise ValueError(f"{name}.span {section.span}: the training state is at iteration {start}")
    return first, end, start, state


def finish_chunk(
    ctx, first, end, models, trainers, history, experience_ids, extra, carry=None
) -> None:
    """The end of a chunk ``[first, end)`` of an RL loop: its training state as an artifact (parent:
    the state it started from, or the SFT policy, and the chunk's rollouts), reported as the
    stage's output with the chunk's history."""
    art = write_state_artifact(
        ctx,
        end,
        models,
        trainers,
        {"history": history, "experience": experience_ids, **extra},
        parents=[ctx.inputs["state"] if ctx.inputs.get("state") else ctx.inputs["sft"]]
        + sorted(set(experience_ids[first:])),
        carry=carry,
    )
    chunk = history[first:]
    ctx.finish(
        {"state": art.id},
        {"iterations_done": end, "reward_mean": chunk[-1]["reward_mean"]},
        history=chunk,
    )


def load_state_artifact(
    ctx: "StageContext", art_id: str, models: dict, trainers: dict
) -> tuple[int, dict]:
    """Inverse of :func:`write_state_artifact`: (step, JSON state), models and trainers loaded."""
    tensors = ctx.store.read_checkpoint(art_id)
    files: dict[str, dict] = {}
    for k, v in tensors.items():
        part, _, name = k.partition("/")
        files.setdefault(part, {})[name] = v
    state = ctx.store.get(art_id, verify=False).meta["state"]
    apply_training_state(files, state, models, trainers, f"training state {art_id[:12]}")
    ctx.log(f"continuing from iteration {state['step']} (training state {art_id[:12]})")
    return state["step"], state


# ---- training ---------------------------------------------------------------------------------


class Trainer:
    """One optimizer over ``params``; ``step(*args)`` runs ``loss_fn(*args) -> (loss, *aux)``,
    aux being tensors to report (a single one is returned bare, several as a tuple).

    With ``opt_cfg.compiled`` (the default) the whole step -- loss and gradients, the data-parallel
    all-reduce, the global gradient norm and, only when loss and norm are finite, clipping and the
    AdamW update -- is one ``mindspore.jit`` graph; otherwise each operator runs eagerly
    (PyNative). Both give the same numbers (tests/test_compiled.py); the graph is 1.5-2x faster
    per step on CPU (bench/train_step_modes.py) but compiles once per input shape, which is why
    the stages pad batch lengths to a multiple of ``opt_cfg.pad_multiple``. Python ints among the
    arguments (a prompt length) are constants of the graph: a new value compiles a new graph."""

    def __init__(self, params, loss_fn, opt_cfg: OptimConfig, dist: Dist, total_steps: int):
        import mindspore as ms
        from mindspore import nn, ops

        from ..optim import fused_update, make_optimizer

        self.params = list(params)
        self.cfg = opt_cfg
        self.total_steps = total_steps
        self.opt = make_optimizer(opt_cfg.optimizer, self.params, opt_cfg.lr, opt_cfg.weight_decay)
        # eager steps: the norm, clipping and update as fused CPU kernels where they run
        self.fused = None if opt_cfg.compiled else fused_update(self.opt)
        self.grad_fn = ms.value_and_grad(loss_fn, None, self.opt.parameters, has_aux=True)
        self.reducer = (
            nn.DistributedGradReducer(self.opt.parameters, mean=True, degree=dist.size)
            if dist.size > 1
            else None
        )
        self.size = dist.size
        self.allreduce = ops.AllReduce() if dist.size > 1 else None
        self.step_num = 0
        self.graph = ms.jit(self._graph_step(ops)) if opt_cfg.compiled else None

    def lr_at(self, step: int) -> float:
        w = self.cfg.warmup_steps
        if w and step < w:
            return self.cfg.lr * (step + 1) / w
        return self.cfg.lr

    def _grads(self, *args):
        outs, grads = self.grad_fn(*args)
        loss = outs[0]
        if self.reducer is not None:
            grads = self.reducer(grads)
            loss = (
                self.allreduce(loss) / self.size
            )  # report the global mean, the same on every rank
        return loss, outs[1:], grads

    def _graph_step(self, ops):
        """The function compiled (graph code cannot import: ``ops`` comes in by closure)."""
        grads_of, opt, clip = self._grads, self.opt, self.cfg.grad_clip

        def train_step(*args):
            loss, aux, grads = grads_of(*args)
            gnorm = ops.sqrt(ops.addn([ops.reduce_sum(g * g) for g in grads]))
            # a graph branch keeps a non-finite step off the weights (the host then raises)
            if ops.logical_and(ops.isfinite(loss), ops.isfinite(gnorm)):
                if clip > 0:
                    grads = ops.clip_by_global_norm(grads, clip)
                opt(grads)
            return loss, aux, gnorm

        return train_step

    def step(self, *args) -> tuple[float, float, tuple]:
        """Returns (loss, grad_norm before clipping, aux)."""
        from mindspore import Tensor, ops

        # in place: after the optimizer's first call, set_data gives the Parameter new storage the
        # optimizer no longer reads, and every later step kept the first step's (warm-up) rate
        ops.assign(self.opt.learning_rate, Tensor(np.float32(self.lr_at(self.step_num))))
        if self.graph is not None:
            loss, aux, gnorm = POOL.call("train", (id(self), *_shape_key(args)), self.graph, *args)
            loss_v, gnorm_v = float(loss.asnumpy()), float(gnorm.asnumpy())
        else:
            loss, aux, grads = self._grads(*args)
            loss_v = float(loss.asnumpy())
            if self.fused is not None:
                gnorm_v = self.fused.grad_norm(grads)
            else:
                gnorm_v = float(
                    np.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in grads))
                )
        if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
            raise NumericalError(
                f"step {self.step_num}: loss={loss_v} grad_norm={gnorm_v}; "
                "stopping with the last good checkpoint kept"
            )
        clip = self.cfg.grad_clip
        if self.graph is None and self.fused is not None:
            self.fused(grads, clip / gnorm_v if clip > 0 and gnorm_v > clip else 1.0)
        elif self.graph is None:
            if clip > 0 and gnorm_v > clip:
                # clip_by_global_norm, one gradient at a time: each clipped copy replaces its
                # gradient, which is freed at once (the whole set copied held one more model-size
                # buffer at the peak: 0.54 GB at SmolLM2-135M)
                grads, scale = list(grads), Tensor(np.float32(clip / gnorm_v))
                for i in range(len(grads)):
                    grads[i] = grads[i] * scale
                grads = tuple(grads)
            self.opt(grads)
        self.step_num += 1
        aux = tuple(aux)
        return loss_v, gnorm_v, (aux[0] if len(aux) == 1 else aux)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return {
            n: p.asnumpy()
            for n, p in self.opt.parameters_and_names()
            if n.startswith(("adam_m.", "adam_v.")) or n == "global_step"
        }

    def load_optimizer_state(self, tensors: dict[str, np.ndarray]) -> None:
        from mindspore import Tensor, ops

        for n, p in self.opt.parameters_and_names():
            if n in tensors:
                ops.assign(p, Tensor(tensors[n]).astype(p.dtype))  # in place, as load_state_dict


def _shape_key(args) -> tuple:
    """What a graph is specialised to: tensor shapes and dtypes, and Python values (constants)."""
    return tuple((tuple(a.shape), str(a.dtype)) if hasattr(a, "shape") else a for a in args)


def global_mean(value: float, dist: Dist) -> float:
    """Mean of a per-rank scalar over the data-parallel ranks (identity for one process)."""
    if dist.size == 1:
        return float(value)
    return float(_sum_over_ranks(np.array([value], np.float32))[0]) / dist.size


def _sum_over_ranks(a: np.ndarray) -> np.ndarray:
    """All-reduce (sum) of a float32 array: the one collective MindSpore 2.9 runs on CPU (its CPU
    AllReduce sums only, in floating point), which is why the gathers below are built on it."""
    from mindspore import Tensor, ops

    return ops.AllReduce()(Tensor(np.ascontiguousarray(a, dtype=np.float32))).asnumpy()


def all_max(value: int, dist: Dist) -> int:
    """The largest of a per-rank integer over the data-parallel ranks (identity for one process)."""
    if dist.size == 1:
        return int(value)
    slots = np.zeros(dist.size, np.float32)
    slots[dist.rank] = value
    return int(_sum_over_ranks(slots).max())


def gather_rows(arrays: dict[str, np.ndarray], dist: Dist) -> dict[str, np.ndarray]:
    """Every rank's rows of each array, concatenated in rank order (each rank holds one contiguous
    shard of a batch, of the same shape on every rank, so this is the whole batch in its order);
    identity for one process. Each rank writes its rows into its slot of a zero buffer and the
    buffers are summed: x + 0 is exact, and token ids and masks are exact in float32."""
    if dist.size == 1:
        return arrays
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.integer) and v.size and np.abs(v).max() >= 2**24:
            raise ValueError(
                f"{k}: integers from {np.abs(v).max()} up do not survive a float32 gather"
            )
        n = v.shape[0]
        buf = np.zeros((dist.size * n, *v.shape[1:]), np.float32)
        buf[dist.rank * n : (dist.rank + 1) * n] = v
        out[k] = _sum_over_ranks(buf).astype(v.dtype)
    return out


def epoch_order(n: int, step: int, batch: int, seed: int) -> np.ndarray:
    """The example indices of global step ``step``: a fresh permutation per epoch, a pure
    function of (seed, step), so a resumed run sees exactly the batches it would have."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch : (k + 1) * batch]


def shard(idx: np.ndarray, dist: Dist) -> np.ndarray:
    """This rank's slice of a global batch."""
    per = len(idx) // dist.size
    return idx[dist.rank * per : (dist.rank + 1) * per]


def minibatches(n: int, size: int, seed: list[int], dist: Dist):
    """Global mini-batches of ``size`` rows over a rollout of ``n`` rows that every rank holds
    whole, in a seeded order; yields (this rank's rows, the whole mini-batch's rows). The same
    mini-batches whatever the number of ranks, so W workers take the steps one worker would."""
    order = np.random.default_rng(seed).permutation(n)
    for s in range(0, n - size + 1, size):
        b = order[s : s + size]
        yield shard(b, dist), b
