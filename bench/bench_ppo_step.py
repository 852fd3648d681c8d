"""Cost of one PPO episode at the demo's settings, phase by phase, with and without each saving.

    python bench/bench_ppo_step.py --run runs/demo                    # all variants, 3 timed steps each
    python bench/bench_ppo_step.py --run runs/demo --variants now fp32 rloo --steps 2

Runs the demo recipe's PPO stage (its `ppo` section, the trained SFT and reward adapters of `--run`) for one
untimed warm-up step and `--steps` timed steps per variant, each variant in a fresh subprocess, and prints
seconds per phase (generation, scoring, optimisation) and episodes/s. Variants:

    before      what a step cost before the savings: the policy re-scored by a full forward, and 4-bit weights
                dequantized on every decoding step (both savings switched off in-process)
    now         the shipped code (the policy's log-probs from generation, one dequantization per generate)
    fp32        `now` on an fp32 base (quantization.mode none): the other numeric path on the CPU
    rloo        `now` with the value-free estimator (advantage_estimator rloo, 4 samples per prompt)

Same prompts, response length and settings in every variant; the numbers are only comparable on a quiet
machine (nothing else running). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_rl_learning import RECIPE, run_overrides  # noqa: E402  (same folder: one setup for both RL benches)

VARIANTS = {"before": [], "now": [], "fp32": ["quantization.mode=none"],
            "rloo": ["ppo.advantage_estimator=rloo", "ppo.num_generations=4"]}
PHASES = ("time/generation", "time/scoring", "time/optimisation", "time/step")


def child(run: Path, variant: str, steps: int) -> dict:
    import torch

    from lora_rlhf.core.data import load_prompts
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.ppo import rollout
    from lora_rlhf.stages.ppo.roles import resolve_sources
    from lora_rlhf.stages.ppo.trainer import build_trainer

    if variant == "before":
        real_generate = rollout.generate
        rollout.dequantized_for_decoding = lambda model: contextlib.nullcontext()

        def generate_then_forget(*args, **kwargs):
            batch = real_generate(*args, **kwargs)
            batch.logprobs = None  # score() then runs the policy forward, as before
            return batch

        rollout.generate = generate_then_forget
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(RECIPE, [*run_overrides(run, Path(tmp)), f"ppo.reward_adapter={run / 'reward'}",
                                      *VARIANTS[variant]])
        torch.manual_seed(0)
        random.seed(0)
        trainer = build_trainer(recipe, resolve_sources(recipe), load_prompts(recipe.data.prompts, 0))
        trainer.num_steps = steps + 1
        timed = [trainer.step()[0] for _ in range(steps + 1)][1:]
    result = {k: statistics.mean(m[k] for m in timed) for k in PHASES}
    result["episodes/s"] = recipe.ppo.batch_size / result["time/step"]
    result["tokens"] = statistics.mean(m["val/response_length"] for m in timed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="a finished demo run folder")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.run, args.child, args.steps)))
        return
    for need in ("sft/lora_rlhf.json", "reward/lora_rlhf.json", "data/prompts_train.jsonl"):
        if not (args.run / need).is_file():
            sys.exit(f"{args.run / need} is missing: run `make demo` first, or point --run at a finished demo run")
    rows = {}
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, "--run", str(args.run), "--steps", str(args.steps),
                              "--child", variant], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant}: {rows[variant]}", flush=True)
    print(f"\n{'variant':>8} | {'generation s':>12} | {'scoring s':>9} | {'optimisation s':>14} | {'step s':>6} | "
          f"{'episodes/s':>10} | {'vs before':>9}")
    base = rows.get("before")
    for variant, r in rows.items():
        speedup = f"{r['episodes/s'] / base['episodes/s']:.2f}x" if base else "-"
        print(f"{variant:>8} | {r['time/generation']:>12.1f} | {r['time/scoring']:>9.1f} | "
              f"{r['time/optimisation']:>14.1f} | {r['time/step']:>6.1f} | {r['episodes/s']:>10.3f} | {speedup:>9}")


if __name__ == "__main__":
    main()
