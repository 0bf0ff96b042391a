"""The reward-hacking watch inside an RL loop (PPO, GRPO): probes of the policy on fixed
held-out prompts, the test of :mod:`mindrlhf.monitor` on them, the alarm, and -- with
``hacking_stop`` -- the best-gold policy kept on disk (and carried from chunk to chunk) so the
stage can end with it."""

from __future__ import annotations

import numpy as np

from ..monitor import suspect
from .common import RunCheckpoints
from .rollout import decode_responses, rollout_config, sample


def probe_policy(policy, proxy, gold, table, n: int, tok, gen_cfg, samples: int) -> dict:
    """The policy's answers to the first ``n`` prompts of ``table``, ``samples`` per prompt,
    sampled as in the rollouts but from the same random streams at every probe (common random
    numbers: a policy that did not change gives the same answers), scored per prompt (mean over
    its samples) by ``proxy(generation, rows)`` -- the reward the loop optimises -- and by
    ``gold(prompts, responses)``, the judge it never sees."""
    gen = rollout_config(gen_cfg)
    sub = table.slice(0, n)
    columns = {c: sub.column(c).to_pylist() for c in sub.column_names}
    scores = np.zeros((2, samples, n))
    for k in range(samples):
        for s in range(0, n, 32):
            rows = {c: v[s : s + 32] for c, v in columns.items()}
            g = sample(policy, rows["prompt_ids"], gen, tok, seed=7919 * (k + 1) + s)
            scores[0, k, s : s + 32] = proxy(g, rows)
            scores[1, k, s : s + 32] = gold(rows["prompt"], decode_responses(g, tok))
    proxy_mean, gold_mean = scores.mean(1)
    return {"proxy": proxy_mean.tolist(), "gold": gold_mean.tolist()}


def mean_gold(probe: dict) -> float:
    return float(np.mean(probe["gold"]))


class HackingWatch:
    """One loop's watch. ``section`` is the loop's config (ppo / grpo: its ``hacking_*`` keys),
    ``model`` the name of the policy in its checkpoints (PPO: actor, GRPO: policy), ``probes``
    the ones an earlier chunk or working checkpoint took (the JSON state)."""

    def __init__(self, ctx, section, model: str, policy, proxy, gold, heldout, tok, probes):
        self.ctx, self.sec, self.model, self.policy = ctx, section, model, policy
        self.proxy, self.gold, self.heldout, self.tok = proxy, gold, heldout, tok
        self.on = gold is not None and section.hacking_probe_every > 0
        self.probes = list(probes or [])
        self.n = min(section.hacking_probe_prompts, heldout.num_rows)
        self.best = RunCheckpoints(ctx.run_dir / "best-gold", ctx.key, keep=1)
        self.keeps = self.on and section.hacking_stop
        if self.keeps and ctx.inputs.get("state") and self.best.latest() is None:
            self.carry_in()

    def start(self, step: int) -> None:
        """Before the first iteration of the loop: the starting policy is the first best."""
        if self.on and step == 0 and not self.probes:
            self.probe(0)

    def due(self, step: int) -> bool:
        return self.on and step % self.sec.hacking_probe_every == 0

    def probe(self, step: int) -> dict | None:
        """Probe the policy at ``step``; the alarm's figures if the watch suspects a hack."""
        from ..models.lora import saved_state

        self.policy.set_train(False)
        p = {"step": step}
        p.update(
            probe_policy(
                self.policy,
                self.proxy,
                self.gold,
                self.heldout,
                self.n,
                self.tok,
                self.ctx.cfg.generation,
                self.sec.hacking_probe_samples,
            )
        )
        self.probes.append(p)
        best = max(mean_gold(q) for q in self.probes)
        if self.keeps and self.ctx.dist.is_main and mean_gold(p) >= best:
            self.best.save(step, {self.model: saved_state(self.policy)}, {"gold": best})
        return suspect(self.probes, self.sec.hacking_margin, self.sec.hacking_z)

    def check(self, step: int, row: dict) -> dict | None:
        """After iteration ``step`` (1-based): probe if due, record the probe's means in the
        metrics ``row``, raise the alarm; its figures, or None."""
        if not self.due(step):
            return None
        alarm = self.probe(step)
        row["probe_proxy"] = float(np.mean(self.probes[-1]["proxy"]))
        row["probe_gold"] = mean_gold(self.probes[-1])
        if alarm:  # the optimised reward up, the gold down: the reward is being exploited
            row["hacking_suspected"] = 1.0
            self.ctx.alarm("reward_hacking", iteration=step, **alarm)
        return alarm

    def stops(self, alarm) -> bool:
        return bool(alarm) and self.sec.hacking_stop

    def carry_in(self) -> None:
        """A chunk after the first: the best-gold policy of the chunks before travels in the
        training state it starts from (tensors ``best_gold/*``); put it where this chunk's stop
        looks for it."""
        if not self.probes:
            return
        tensors = self.ctx.store.read_checkpoint(self.ctx.inputs["state"])
        kept = {k.partition("/")[2]: v for k, v in tensors.items() if k.startswith("best_gold/")}
        if kept:
            best = max(self.probes, key=mean_gold)
            self.best.save(best["step"], {self.model: kept}, {"gold": mean_gold(best)})

    def carry_out(self) -> dict | None:
        """What the next chunk needs of the watch besides the probes: the best-gold policy."""
        kept = self.best.latest() if self.keeps else None
        return {"best_gold": RunCheckpoints.load(kept[1])[0][self.model]} if kept else None

    def restore_best(self, alarm, last_step: int) -> dict:
        """Load the best-gold probe's policy into the loop's policy; what the stage records."""
        from ..models.lora import load_saved_state

        step, path = self.best.latest()
        load_saved_state(self.policy, RunCheckpoints.load(path)[0][self.model], source=str(path))
        self.ctx.log(
            f"stopped early at iteration {last_step}: kept the policy of iteration {step}, the "
            "best gold score on the probe prompts"
        )
        return {"at_iteration": last_step, "kept_iteration": step, "alarm": alarm}

    def summary(self) -> list:
        """The probes for the checkpoint's manifest: step, mean proxy, mean gold."""
        return [[p["step"], float(np.mean(p["proxy"])), mean_gold(p)] for p in self.probes]
