"""One optimizer step over the global batch (method and backbone meet here, through the engine)."""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import torch

from flowbp import _testing_hooks as hooks
from flowbp.config import TrainConfig
from flowbp.engine import surrogate
from flowbp.losses import reward_loss
from flowbp.methods import make_plan
from flowbp.training.accelerator import any_rank, gather_objects, whole
from flowbp.training.run import Run
from flowbp.trajectory import rollout


def plan_digest(plan: Any) -> int:
    """A 63-bit fingerprint of a plan (anchors, actives, weights, couplings, scales) for cross-rank checks."""
    text = repr((plan.anchors, plan.active, plan.segments, plan.coupling, plan.grad_scale, plan.renoised))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def backward_scale(c: TrainConfig, backbone: Any) -> float:
    """1/g under ``cfg_grad_compensate`` with real CFG (g > 1), else 1."""
    if not c.cfg_grad_compensate:
        return 1.0
    g = c.guidance_scale if c.guidance_scale is not None else getattr(backbone, "default_guidance_scale", 1.0)
    return 1.0 / g if g > 1.0 else 1.0


def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step over the global batch; non-finite steps are skipped (no update)."""
    c, bb, gens, acc = run.config, run.backbone, run.generators, run.accelerator
    t0 = time.perf_counter()
    step = run.step + 1
    world, accum = acc.num_processes, c.gradient_accumulation_steps
    micro = c.batch_size // (world * accum)
    # the global batch, drawn identically on every rank; this rank keeps its shard
    idx = torch.randint(len(run.prompts), (c.batch_size,), generator=gens["data"])
    noise = bb.initial_noise(c.batch_size, gens["data"])
    # one plan per optimizer step, shared by its micro-batches and by every rank
    plan = make_plan(c.method, run.sigmas, gens["plan"], **c.method_args)
    digests = [int(d) for d in gather_objects(acc, plan_digest(plan))]
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks drew different plans at step {step}: {digests} (plan generators out of sync)")
    rewards, losses, weights, deviations = [], [], [], []
    for m in range(accum):
        lo = (acc.process_index * accum + m) * micro
        prompts = [run.prompts[i] for i in idx[lo : lo + micro].tolist()]
        with acc.accumulate(run.prepared):
            cond = bb.encode_prompts(prompts)
            velocity = bb.velocity_fn(cond, c.guidance_scale, detach_uncond=c.detach_negative)
            traj = rollout(velocity, noise[lo : lo + micro], run.sigmas)
            out = surrogate(plan, traj, velocity, generator=gens["renoise"])
            scores = [run.reward(bb.decode(x), prompts) for x in out.inputs]
            scores = hooks.poison_rewards(scores, step)
            loss = reward_loss(scores, out.sample_weights.to(scores[0].device), c.loss, c.loss_margin)
            hooks.kill_point("mid-step", step)
            acc.backward(loss * backward_scale(c, bb))
        rewards.append(scores[0].detach().float())
        losses.append(loss.detach().float().reshape(1))
        weights.append(out.sample_weights.detach().float().to(acc.device))
        deviations.append({str(a): float(d.mean()) for a, d in out.deviations.items()})
    # logged values are over the global batch
    all_rewards = acc.gather(torch.cat(rewards))
    loss_value = float(acc.gather(torch.cat(losses)).mean())
    sample_weight = float(acc.gather(torch.cat(weights)).mean())
    params = list(run.parameters.values())
    if c.max_grad_norm > 0:
        grad_norm = float(whole(acc.clip_grad_norm_(params, c.max_grad_norm)))
    else:
        grad_norm = float(torch.norm(torch.stack([whole(p.grad).norm() for p in params if p.grad is not None])))
    lr = float(run.optimizer.param_groups[0]["lr"])  # the rate this step uses
    reward_value = float(all_rewards.mean())
    finite = math.isfinite(reward_value) and math.isfinite(loss_value) and math.isfinite(grad_norm)
    skip = any_rank(acc, not finite)
    if skip:  # no optimizer, EMA (nor moment) update: the poisoned gradient is dropped
        run.skipped += 1
        run.consecutive_skips += 1
    else:
        run.optimizer.step()
        if run.ema is not None:
            run.ema.step(params)
        run.consecutive_skips = 0
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step = step

    def clean(x: float) -> float | None:  # JSON has no NaN
        return x if math.isfinite(x) else None

    record = {
        "step": step,
        "reward": clean(reward_value),
        "loss": clean(loss_value),
        "grad_norm": clean(grad_norm),
        "skipped": skip,
        "lr": lr,
        "anchors": list(plan.anchors),
        "grad_forwards": plan.grad_forwards,
        "plan_digests": digests,
        "sample_weight": sample_weight,
        "connector_deviation": {k: sum(d[k] for d in deviations) / len(deviations) for k in deviations[0]},
        "seconds": time.perf_counter() - t0,
    }
    run.history.append(record)
    return record


def log_step(run: Run, record: dict[str, Any]) -> None:
    if not run.accelerator.trackers:
        return
    values: dict[str, Any] = {
        f"train/{k}": record[k] for k in ("reward", "loss", "grad_norm", "sample_weight", "seconds", "lr")
        if record[k] is not None
    }
    values["train/skipped_total"] = run.skipped
    values.update({f"connector/d_{a}": d for a, d in record["connector_deviation"].items()})
    run.accelerator.log(values, step=record["step"])
