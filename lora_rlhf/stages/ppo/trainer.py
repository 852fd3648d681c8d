"""Step 3: PPO with a per-token KL penalty (and PPO-ptx), all four roles on ONE shared base.

Every PPO step takes `batch_size` prompts and runs, in order:

    1. roll out     sample one response per prompt from the policy (KV cache; stop at end-of-turn), keeping
                    the sampled tokens' log-probs that generation computed anyway
    2. score        log-probs under the reference, values, and the reward of each episode
    3. rewards      per token: -beta * KL(policy || reference); plus the (normalised) score on the last token
    4. advantages   GAE(gamma, lambda) against the value function, whitened over the batch; or, value-free
                    (`advantage_estimator` rloo / grpo), from the num_generations samples of each prompt
    5. optimise     num_ppo_epochs x num_mini_batches optimizer steps (x gradient accumulation) on
                    clipped policy loss + vf_coef * clipped value loss (+ ptx_coef * LM loss on data.ptx)
    6. log / save   metrics.jsonl, samples, progress; beta adapts (adaptive_kl); checkpoint every save_steps

Data parallel (under torchrun / accelerate launch, N ranks): each rank rolls out and scores its share of the
step's prompts (1-2), then every rank gathers the global batch (token ids and a few floats per token: KBs) and
computes 3-4 on it identically, so reward normalisation, whitening, group baselines and the KL controller see
the global batch. In 5 each rank backpropagates its share of every micro-batch, weighted by its share of the
micro-batch's tokens, and the trainable gradients (policy + value LoRA and the value head: 336 MB at 8B r16) are summed
across ranks before each optimizer step; every rank then holds the same adapters, and the result equals one
process's (tests/test_distributed.py). Not DDP: it hooks one model whose parameters all take part in every
backward, while here the policy and the value backpropagate separately through one model whose active adapter
changes (DDP's "unused parameters" / "reduction not finished" errors: peft #905, trl #982); one explicit sum per
optimizer step is also all DDP would communicate.

How this differs from TRL 1.12's PPOTrainer (whose config names we keep):
- One base, four adapters: the policy and value adapters train together under one optimizer; reference and
  reward are frozen adapters (or the bare base) on the same weights.
- The policy's and the value's losses are backpropagated separately, each while its own adapter is active:
  with gradient checkpointing, backward re-runs the forward, which must see the same adapter. The gradients
  are the same as for the summed loss.
- The score lands on the last real response token (TRL put it one position after the end when it could).
- The paper's additions: PPO-ptx, an adaptive KL coefficient, running normalisation of reward scores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import resource
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lora_rlhf.core import distributed
from lora_rlhf.core.adapters import META_FILE
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.data import load_prompts
from lora_rlhf.core.io import read_jsonl, write_json_atomic
from lora_rlhf.core.loading import load_tokenizer
from lora_rlhf.core.text import fit_prompts
from lora_rlhf.errors import DataError, LoraRlhfError, RecipeError
from lora_rlhf.recipe.config import Recipe, recipe_to_dict, save_recipe
from lora_rlhf.stages.memory import StageMemory, check_memory
from lora_rlhf.stages.ppo import checkpoint as ckpt
from lora_rlhf.stages.ppo import losses, rollout
from lora_rlhf.stages.ppo.kl import RunningMoments, make_kl_controller
from lora_rlhf.stages.ppo.outputs import QuietRunLog, RunLog, write_run_info
from lora_rlhf.stages.ppo.ptx import PtxData, epoch_order, load_ptx_rows, ptx_loss, rank_share
from lora_rlhf.stages.ppo.roles import Sources, check_bases, resolve_sources, setup_roles
from lora_rlhf.stages.ppo.rollout import Batch, RewardFn, RewardSource
from lora_rlhf.stages.ppo.tracking import check_trackers

log = logging.getLogger("lora_rlhf.stages.ppo")
SAVED = "the end of PPO (rank 0 saves the adapters)"


class NonFiniteError(LoraRlhfError):
    """A loss or reward became NaN or infinite: training stops before anything bad is saved."""


class PPOTrainer:
    """The PPO loop over one SharedBase whose role adapters are already set up (roles.setup_roles)."""

    def __init__(self, recipe: Recipe, sb: SharedBase, prompts: list[Any],
                 reward: RewardSource, ptx: PtxData | None = None, memory: StageMemory | None = None,
                 gold: RewardFn | None = None):
        from transformers import get_scheduler

        self.recipe, self.cfg, self.sb, self.prompts = recipe, recipe.ppo, sb, prompts
        self.reward, self.ptx = reward, ptx
        self.gold = RewardSource(f"ppo.gold_fn {self.cfg.gold_fn}", fn=gold) if gold is not None else None
        self.memory = memory
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.num_steps = self.cfg.num_steps
        self.step_index = 0          # PPO steps done
        self.prompt_position = 0     # prompts served so far (indexes a per-pass shuffled order)
        self.kl_ctl = make_kl_controller(self.cfg)
        self.score_stats = RunningMoments()
        # Fixed order: the optimizer state in a checkpoint is matched to parameters by position.
        self.with_value = self.cfg.advantage_estimator == "gae"
        self.params = sb.trainable_parameters("policy") + (sb.trainable_parameters("value") if self.with_value else [])
        # Ranks start from identical adapters (same seed), and stay identical since they apply the same summed
        # gradients; broadcasting rank 0's makes the start independent of how each rank reached this point.
        distributed.broadcast_(self.params)
        # Gradients live for the whole run, allocated here, before any activation, and zeroed in place after each
        # optimizer step. Re-allocated during every backward (set_to_none), ~850 small long-lived tensors land
        # between the step's freed 1-2 MB temporaries and pin the CPU heap open: the TRL anchor's two steps peaked
        # at 2.4-2.6 GB of resident memory with them, 1.8-1.9 GB without (same live tensors, same time).
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)
        # fp16 forwards (autocast on a GPU without native bf16) give gradients that underflow fp16's range without
        # loss scaling, as SFT and reward get it from the Trainer (fp16=True); bf16 has fp32's range and needs none.
        # Disabled, the scaler passes the loss, the step and everything else through unchanged.
        self.scaler = torch.amp.GradScaler(sb.device.type, enabled=sb.autocast_dtype == torch.float16)
        self.scheduler = get_scheduler(self.cfg.lr_scheduler_type, self.optimizer, num_warmup_steps=0,
                                       num_training_steps=self.num_steps)

    # ------------------------------------------------------------------ one PPO step
    def step(self) -> tuple[dict[str, float], Batch]:
        """Run one PPO step (1-5 above); return its metrics and the scored batch."""
        cfg, device = self.cfg, self.sb.device
        t0 = time.perf_counter()
        self._train_mode(False)

        # 1. Roll out: num_generations sampled responses per prompt, from the policy, with their log-probs
        #    (this rank's share of the step's prompts).
        batch = rollout.generate(self.sb, self._next_prompts(), cfg)
        t1 = time.perf_counter()

        # 2. Score: reference log-probs, values, and the reward of every episode; then the global batch.
        batch = rollout.score(self.sb, batch, self.reward, cfg)
        batch = rollout.gather(batch, self.sb.tokenizer.pad_token_id)
        check_finite(batch.scores, "reward scores", self.step_index + 1)
        # The gold monitor (ppo.gold_fn) judges the same global batch; it is logged, never optimised.
        gold = rollout.function_scores(self.gold, batch) if self.gold is not None else None
        t2 = time.perf_counter()

        # 3. KL-shaped rewards: -beta * KL on every token, the normalised score on the last one.
        mask = batch.response_mask
        scores = self._normalised_scores(batch)
        kl = losses.kl_penalty(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator) * mask
        kl_coef = self.kl_ctl.value
        rewards, non_score = losses.shaped_rewards(scores, kl, kl_coef, mask)
        if cfg.whiten_rewards:
            rewards = losses.masked_whiten(rewards, mask, shift_mean=False)

        # 4. Advantages: GAE against the rollout's values, then whitened over the batch; value-free estimators
        #    give every token of an episode its sequence advantage against the other samples of its prompt.
        if self.with_value:
            advantages, returns = losses.gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
            advantages = losses.masked_whiten(advantages, mask)
        else:
            sequence = losses.sequence_rewards(scores, kl, kl_coef, mask)
            advantages = losses.group_advantages(sequence, cfg.num_generations, cfg.advantage_estimator)
            advantages, returns = advantages.unsqueeze(1) * mask, torch.zeros_like(mask)

        # 5. Optimise the policy and value adapters (and the value head) on this batch.
        self._train_mode(True)
        lr = self.scheduler.get_last_lr()[0]
        stats = self._optimise(batch, advantages, returns)
        self.scheduler.step()
        t3 = time.perf_counter()

        mean_kl = kl.sum(1).mean().item()
        self.kl_ctl.update(mean_kl, len(batch.prompts))
        self.step_index += 1
        n_tokens = int(batch.lengths.sum())
        metrics = {
            "step": self.step_index, "episode": self.step_index * cfg.batch_size,
            "objective/scores": batch.scores.mean().item(),
            **({"objective/gold": gold.mean().item()} if gold is not None else {}),
            "objective/kl": mean_kl,
            "objective/entropy": (-batch.logprobs).sum(1).mean().item(),
            "objective/non_score_reward": non_score.sum(1).mean().item(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean().item(),
            **stats,
            "val/ended": batch.ended.float().mean().item(),
            "val/response_length": batch.lengths.float().mean().item(),
            "kl_coef": kl_coef, "lr": lr,
            "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/optimisation": t3 - t2,
            "time/step": t3 - t0, "tokens/s": n_tokens / (t3 - t0), "episodes/s": len(batch.prompts) / (t3 - t0),
            "memory/peak_gb": distributed.max_over_ranks(self._peak_gb(device)),
        }
        if device.type == "cuda":  # every rank's device is of one type: all ranks take part or none
            metrics["memory/peak_reserved_gb"] = distributed.max_over_ranks(
                torch.cuda.max_memory_reserved(device) / 2**30)
        return metrics, batch

    def _next_prompts(self) -> list[Any]:
        """This rank's share of the step's prompts, each repeated num_generations times in a row (the groups
        rloo/grpo compare); rank r takes the r-th contiguous share, so the gathered batch is in one process's order."""
        n, k = len(self.prompts), self.cfg.num_generations
        start = self.prompt_position
        distinct = self.cfg.batch_size // k
        self.prompt_position += distinct
        share = distinct // self.world
        return [self.prompts[epoch_order(n, self.recipe.seed, start + i)]
                for i in range(self.rank * share, (self.rank + 1) * share) for _ in range(k)]

    def _normalised_scores(self, batch: Batch) -> torch.Tensor:
        scores = batch.scores
        if self.cfg.normalize_reward:
            self.score_stats.update(scores.tolist())
            scores = torch.tensor([self.score_stats.normalize(s) for s in scores.tolist()], device=scores.device)
        if self.cfg.missing_eos_penalty is not None:
            scores = scores - self.cfg.missing_eos_penalty * (~batch.ended).float()
        return scores

    def _optimise(self, batch: Batch, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        size = len(batch.prompts)
        mini = size // cfg.num_mini_batches
        micro = mini // cfg.gradient_accumulation_steps
        # The shuffle is a function of (seed, step), so a resumed run shuffles exactly like an uninterrupted one.
        generator = torch.Generator().manual_seed(self.recipe.seed * 100003 + self.step_index)
        stats: dict[str, list[float]] = defaultdict(list)
        mask = batch.response_mask
        for _ in range(cfg.num_ppo_epochs):
            order = torch.randperm(size, generator=generator)
            for start in range(0, size, mini):
                for micro_start in range(start, start + mini, micro):
                    idx = order[micro_start:micro_start + micro].to(advantages.device)
                    # This rank's part of the micro-batch, weighted by its share of the micro-batch's tokens: the
                    # ranks' weighted losses sum to the loss one process computes on the whole micro-batch.
                    own = idx.chunk(self.world)[self.rank]
                    share = float(mask[own].sum() / mask[idx].sum().clamp(min=1))
                    self._backward(batch.select(own), advantages[own], returns[own], stats, share)
                distributed.all_reduce_sum_(self._grads())
                self.scaler.unscale_(self.optimizer)  # the same summed gradients on every rank: the same verdict
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                stats["policy/grad_norm"].append(float(grad_norm))
                self.scaler.step(self.optimizer)  # skipped (fp16 only) when a gradient overflowed
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=False)  # kept allocated: see __init__
        return distributed.mean_over_ranks({k: sum(v) / len(v) for k, v in stats.items()})

    def _grads(self) -> list[torch.Tensor]:
        """Every trainable parameter's gradient (zeros where a rank's part gave none), in a fixed order."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def _backward(self, mb: Batch, advantages: torch.Tensor, returns: torch.Tensor,
                  stats: dict[str, list[float]], share: float = 1.0) -> None:
        """Accumulate the gradients of one micro-batch (this rank's part, holding `share` of its tokens):
        policy (+ ptx) first, then value."""
        cfg, step = self.cfg, self.step_index + 1
        mask, scale = mb.response_mask, share / cfg.gradient_accumulation_steps
        sb = self.sb
        with sb.use("policy") as model:
            with sb.autocast():  # forwards in the compute dtype on a GPU; backward outside autocast
                logprobs, entropy = rollout.response_logprobs(sb, mb, cfg.temperature, with_entropy=True)
                pg_loss, pg_stats = losses.policy_loss(logprobs, mb.logprobs, advantages, mask, cfg.cliprange)
                loss = pg_loss * scale
                if self.ptx is not None:
                    ptx_batch = self.ptx.next_batch(cfg.ptx_batch_size, sb.tokenizer.pad_token_id, sb.device)
                    ptx_part, ptx_share = rank_share(ptx_batch, self.rank, self.world)
                    if ptx_share > 0:  # a rank whose rows hold no target token adds nothing
                        lm_loss = ptx_loss(model, ptx_part)
                        loss = loss + cfg.ptx_coef * lm_loss * ptx_share / cfg.gradient_accumulation_steps
                        stats["loss/ptx"].append(lm_loss.item())
            check_finite(loss, "policy loss", step)
            self.scaler.scale(loss).backward()
        stats["policy/entropy"].append(losses.masked_mean(entropy, mask).item())
        stats["loss/policy"].append(pg_loss.item())
        stats["policy/approxkl"].append(pg_stats["approxkl"].item())
        stats["policy/clipfrac"].append(pg_stats["clipfrac"].item())
        stats["val/ratio"].append(pg_stats["ratio"].item())
        if not self.with_value:
            return
        with sb.use("value"):
            with sb.autocast():
                values = rollout.response_values(sb, mb)
                vf_loss, vf_stats = losses.value_loss(values, mb.values, returns, mask, cfg.cliprange_value)
            check_finite(vf_loss, "value loss", step)
            self.scaler.scale(cfg.vf_coef * vf_loss * scale).backward()
        stats["loss/value"].append(vf_loss.item())
        stats["val/clipfrac"].append(vf_stats["clipfrac"].item())

    def _peak_gb(self, device: torch.device) -> float:
        """The stage's peak so far (since its preflight), in GB."""
        if self.memory is not None:
            return self.memory.peak_gb()
        return peak_memory_gb(device)

    def _train_mode(self, on: bool) -> None:
        self.sb.train(on)

    # ------------------------------------------------------------------ state for checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_index, "prompt_position": self.prompt_position,
                "ptx_position": self.ptx.position if self.ptx is not None else 0,
                "kl_controller": self.kl_ctl.state_dict(), "score_stats": self.score_stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_index, self.prompt_position = int(state["step"]), int(state["prompt_position"])
        if self.ptx is not None:
            self.ptx.position = int(state["ptx_position"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.score_stats.load_state_dict(state["score_stats"])


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteError(
            f"the {what} became NaN or infinite at PPO step {step}; training stopped and the last checkpoint "
            "(OUT/ppo/checkpoint) was left as it was",
            fix="check the reward model / reward function for NaN or inf outputs; lower ppo.learning_rate or raise "
                "ppo.kl_coef; then continue with --resume")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[dict[str, bool]]:
    """First Ctrl-C: finish the current PPO step, save a checkpoint, stop. Second Ctrl-C: stop at once (the last
    checkpoint stays intact). Saving mid-step would store a half-updated model that --resume could not
    continue exactly."""
    state = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        if state["requested"]:
            raise KeyboardInterrupt
        state["requested"] = True
        log.warning("Ctrl-C: finishing this PPO step, then saving a checkpoint (Ctrl-C again stops at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------- the run: setup -> loop -> save
def train_ppo(recipe: Recipe, resume: bool | None = None, stage: str = "ppo", progress: bool = True) -> dict[str, Any]:
    """`lora-rlhf ppo`: check every input, load the base once, run PPO, write OUT/<stage>. Returns final metrics.

    resume: True continues from OUT/<stage>/checkpoint (which must exist); False refuses to start over an
    existing run; None (the pipeline's default) continues when there is a checkpoint and starts otherwise.
    """
    cfg, out = recipe.ppo, recipe.stage_dir(stage)
    # Setup. Everything the user gave is checked before anything is written or loaded (on every rank, so a bad
    # input stops all of them with the same message instead of leaving some waiting in a collective).
    distributed.refuse_sharded_engine(stage)
    distributed.configure(recipe)
    sources = resolve_sources(recipe)
    check_bases(recipe, sources)
    prompts = load_prompts(recipe.data.prompts, recipe.seed)
    ptx_rows = _ptx_rows(recipe)
    world = distributed.world_size()
    problems = cfg.world_size_problems(world, with_ptx=ptx_rows is not None)
    if problems:
        raise RecipeError(problems, source=f"{stage} on {world} ranks")
    check_trackers(cfg.report_to)
    existing = ckpt.find_checkpoint(out)
    compat = {**_resume_fields(recipe, sources), "world_size": world}
    if resume is None:
        resume = existing is not None
    if resume:
        if existing is None:
            raise LoraRlhfError(f"--resume was given but '{out}' holds no PPO checkpoint",
                                fix="start the run without --resume")
        _check_resumable(json.loads((existing / ckpt.STATE_FILE).read_text()).get("compat", {}), compat)
    elif existing is not None:
        raise LoraRlhfError(f"'{out}' already holds a PPO run (checkpoint in {existing.name}/)",
                            fix="continue it with --resume, or set another output_dir, or delete that folder")
    # Tokenised before the preflight: a ptx batch is as long as its longest row and a rollout as its longest
    # prompt, which size the prediction. `lora-rlhf ppo` with ptx_coef > 0 is PPO-ptx too: planned with its
    # LM-loss rows whatever the folder's name.
    tokenizer = load_tokenizer(recipe.model)
    prompts, fitted = fit_prompts(tokenizer, prompts, cfg.max_prompt_length, cfg.long_prompts)
    if not prompts:
        raise DataError(f"all {fitted.longer} prompts of data.prompts are longer than ppo.max_prompt_length="
                        f"{cfg.max_prompt_length} tokens and were dropped (ppo.long_prompts: {cfg.long_prompts})",
                        fix="raise ppo.max_prompt_length, or set ppo.long_prompts: truncate" if cfg.long_prompts ==
                        "drop" else "raise ppo.max_prompt_length above the tokens the chat template adds by itself")
    if fitted.longer:
        log.warning("PPO: %s (ppo.max_prompt_length, ppo.long_prompts: %s)", fitted.describe(), cfg.long_prompts)
    ptx = PtxData.build(ptx_rows, tokenizer, cfg.ptx_max_length, recipe.seed) if ptx_rows else None
    memory = check_memory(recipe, "ppo-ptx" if ptx else "ppo", sequence_length=ptx.longest if ptx else None,
                          prompt_length=fitted.longest)
    main = distributed.is_main()  # rank 0 alone writes; the other ranks compute and stay silent
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "recipe.yaml")

    trainer = build_trainer(recipe, sources, prompts, ptx, memory, tokenizer)
    sb = trainer.sb
    if resume:
        trainer.load_state_dict(ckpt.load_checkpoint(existing, sb, trainer.optimizer, trainer.scheduler,
                                                     trainer.rank, trainer.scaler))
    roles = sources.describe(trainer.with_value)
    if main:
        write_run_info(out, {"base": sb.info, "device": str(sb.device), "world_size": world, "roles": roles,
                             "num_steps": trainer.num_steps, "memory/predicted_gb": memory.metrics()[
                                 "memory/predicted_gb"], "prompts": len(prompts), "longest_prompt": fitted.longest,
                             "prompts_truncated": fitted.truncated, "prompts_dropped_too_long": fitted.dropped},
                       trainer.step_index if resume else None)
        runlog: RunLog | QuietRunLog = RunLog(out, cfg, recipe_to_dict(recipe), trainer.step_index,
                                              trainer.num_steps, progress)
    else:
        runlog = QuietRunLog()
    log.info("PPO: %s; %d steps of %d episodes; roles: %s%s", distributed.describe(), trainer.num_steps,
             cfg.batch_size, roles, f"; resumed at step {trainer.step_index}" if resume else "")
    try:
        final = fit(trainer, runlog, out, compat)
    finally:
        runlog.close()
    if not main:
        distributed.barrier(SAVED)  # return once rank 0 has written the adapters the next stage reads
        return final

    # Save. policy/lora_rlhf.json marks the whole stage complete (pipeline, eval and push look for it), so it is
    # removed first and written last: value adapter, then metrics.json, then the policy with its marker.
    trained = ckpt.trained_roles(sb)
    for role in trained:
        (out / role / META_FILE).unlink(missing_ok=True)
    for role in [r for r in trained if r != "policy"]:
        sb.save_adapter(role, out / role, stage="ppo")
    write_json_atomic(out / "metrics.json", final)
    sb.save_adapter("policy", out / "policy", stage="ppo")
    distributed.barrier(SAVED)
    return final


def build_trainer(recipe: Recipe, sources: Sources, prompts: list[Any], ptx: PtxData | None = None,
                  memory: StageMemory | None = None, tokenizer: Any = None) -> PPOTrainer:
    """Load the base once, put the four roles on it, and return a trainer at step 0. `ptx`: PPO-ptx's tokenised
    rows (PtxData.build); `memory` (from `check_memory`) is where the stage's peak is read; without one the peak
    counts from here; `tokenizer`: the model's, when already loaded."""
    if memory is None:
        memory = check_memory(recipe, "ppo-ptx" if ptx else "ppo", sequence_length=ptx.longest if ptx else None)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    sb = SharedBase.load(recipe.model, recipe.quantization, tokenizer=tokenizer)
    reward = setup_roles(sb, recipe, sources)
    return PPOTrainer(recipe, sb, prompts, reward, ptx, memory, sources.gold_fn)


def fit(trainer: PPOTrainer, runlog: RunLog | QuietRunLog, out: Path, compat: dict[str, Any]) -> dict[str, float]:
    """PPO steps until total_episodes, with step 6 (log / samples / checkpoint) after each."""
    cfg = trainer.cfg
    metrics: dict[str, float] = {}
    if trainer.step_index >= trainer.num_steps:
        log.info("nothing to do: the run finished at step %d (raise ppo.total_episodes to train on)",
                 trainer.step_index)
        return _last_metrics(out)
    with deferred_interrupt() as interrupt:
        while trainer.step_index < trainer.num_steps:
            metrics, batch = trainer.step()
            # 6. Log, show samples, checkpoint.
            step = trainer.step_index
            # Ctrl-C reaches the ranks at slightly different moments: stop where any rank was asked to.
            interrupt["requested"] = bool(distributed.max_over_ranks(float(interrupt["requested"])))
            runlog.step(metrics)
            if step % cfg.sample_every == 0 or step == 1:
                runlog.samples(step, batch.prompts, batch.texts, batch.scores.tolist())
            if interrupt["requested"] or step % cfg.save_steps == 0 or step == trainer.num_steps:
                rng = distributed.gather_objects(ckpt.rng_state())  # each rank samples with its own stream
                if distributed.is_main():
                    ckpt.save_checkpoint(out, trainer.sb, trainer.optimizer, trainer.scheduler,
                                         {**trainer.state_dict(), "compat": compat}, rng, trainer.scaler)
                distributed.barrier("a PPO checkpoint (rank 0 writes it)")
            if interrupt["requested"]:
                log.warning("stopped after PPO step %d; the checkpoint is saved: continue with --resume", step)
                raise KeyboardInterrupt
    return metrics


def _ptx_rows(recipe: Recipe) -> list[dict[str, Any]] | None:
    if recipe.ppo.ptx_coef <= 0:
        if recipe.data.ptx is not None:
            log.warning("data.ptx is ignored: ppo.ptx_coef is 0 (set it > 0 for PPO-ptx)")
        return None
    if recipe.data.ptx is None:
        raise DataError(f"ppo.ptx_coef is {recipe.ppo.ptx_coef} but the recipe has no data.ptx for PPO-ptx's "
                        "language-modelling loss", fix="add `data: {ptx: {path: text.jsonl}}` (text or "
                        "prompt/completion rows), or set ppo.ptx_coef: 0")
    return load_ptx_rows(recipe.data.ptx, recipe.seed)


# The KL settings a resumed run must share with its checkpoint: the checkpoint restores the KL controller (beta, and
# the adaptive controller's target and horizon), which would silently replace a changed kl_coef, target_kl or
# kl_horizon, and a changed estimator or adaptive_kl would change what the run's penalty means half-way.
KL_SETTINGS = ("kl_coef", "kl_estimator", "adaptive_kl", "target_kl", "kl_horizon")


def _resume_fields(recipe: Recipe, sources: Sources) -> dict[str, Any]:
    """Settings a checkpoint only fits when unchanged. A checkpoint written before a field was added here lacks it
    and is not checked for it."""
    lora = recipe.lora
    return {"model.name": recipe.model.name, "quantization.mode": recipe.quantization.mode,
            "ppo.advantage_estimator": recipe.ppo.advantage_estimator, "ppo.num_generations": recipe.ppo.num_generations,
            "lora.r": lora.r, "lora.alpha": lora.alpha, "lora.target_modules": lora.target_modules,
            "ppo.sft_adapter": str(sources.sft), "ppo.reward": sources.describe()["reward"],
            **{f"ppo.{name}": getattr(recipe.ppo, name) for name in KL_SETTINGS}}


def _check_resumable(saved: dict[str, Any], now: dict[str, Any]) -> None:
    changed = [f"{k} was {saved[k]!r} when the checkpoint was written, now {now.get(k)!r}" + _kl_note(k, saved[k], now.get(k))
               for k in saved if saved[k] != now.get(k) and k != "world_size"]
    if saved.get("world_size", now["world_size"]) != now["world_size"]:
        # Each rank's sampling stream and share of the prompts are part of the state: they only continue exactly
        # on the same number of ranks.
        changed.append(f"the checkpoint was written by {saved['world_size']} process(es), this run has "
                       f"{now['world_size']}: relaunch with {saved['world_size']} (torchrun --nproc_per_node / "
                       "accelerate launch --num_processes), or start a new run in another output_dir")
    if changed:
        raise RecipeError(changed, source="--resume: the checkpoint does not fit this recipe (resume with the "
                                          "recipe the run started with, saved as OUT/ppo/recipe.yaml)")


def _kl_note(key: str, before: Any, after: Any) -> str:
    """Why a changed KL setting is refused and the two ways on, for `_check_resumable`'s message."""
    name = key.removeprefix("ppo.")
    if name not in KL_SETTINGS:
        return ""
    why = ("the KL penalty would change its meaning half-way through the run" if name in ("kl_estimator", "adaptive_kl")
           else "the KL controller restored from the checkpoint would silently replace it")
    old = str(before).lower() if isinstance(before, bool) else before
    return (f": {why} (fix: continue this run with --set {key}={old}, or start a new run in another output_dir to "
            f"train with {after!r})")


def _last_metrics(out: Path) -> dict[str, float]:
    rows = read_jsonl(out / "metrics.jsonl", "PPO log", cut_short_tail=True) if (out / "metrics.jsonl").is_file() else []
    return rows[-1][1] if rows else {}
