"""Does the RL stage learn within the demo's budget? The PPO stage alone, on a finished demo run's data and
adapters, for N episodes: the learning curve (mean reward and KL per step) and held-out compliance at the end.

    python bench/bench_rl_learning.py --run runs/demo --episodes 96 --reward checker      # RL alone, no RM noise
    python bench/bench_rl_learning.py --run runs/demo --episodes 96 --reward rm           # the trained RM
    python bench/bench_rl_learning.py --run runs/demo --episodes 96 --estimator rloo --num-generations 4
    python bench/bench_rl_learning.py --run runs/demo --seeds 0 1 2                       # spread over seeds
    python bench/bench_rl_learning.py --run runs/demo --episodes 960 --eval-at 96 288     # 1x, 3x, 10x budget

`--run` is the output folder of `make demo` (or of `lora-rlhf pipeline recipes/demo_smollm2_cpu.yaml` with
at least the data, sft and, for `--reward rm`, compare and reward stages). The reward is either the
programmatic checker (`lora_rlhf.tasks.ifeval_lite:reward`: tells whether the RL itself learns) or the
trained reward model (tells whether the RM is the bottleneck). Everything else is the demo recipe's `ppo`
section, with `--set` overrides. Held out: `--eval-prompts` (128) prompts from the demo's generator, disjoint
from all training prompts, answered greedily by the SFT reference and by the trained policy, scored by the
checker's strict compliance (also per constraint type); the paired difference comes with a 95 % bootstrap
interval over prompts. This is a measurement, not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "demo_smollm2_cpu.yaml"
CHECKER = "lora_rlhf.tasks.ifeval_lite:reward"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="a finished demo run folder")
    parser.add_argument("--episodes", type=int, default=96, help="PPO episodes (the demo's ppo.total_episodes: 96)")
    parser.add_argument("--reward", choices=["checker", "rm"], default="checker")
    parser.add_argument("--estimator", choices=["gae", "rloo", "grpo"], default="gae")
    parser.add_argument("--num-generations", type=int, default=None, help="samples per prompt (rloo/grpo: 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-prompts", type=int, default=128,
                        help="held-out prompts, made by the demo's generator (disjoint from every training prompt)")
    parser.add_argument("--eval-at", type=int, nargs="*", default=None, metavar="EPISODES",
                        help="also evaluate after these many episodes (e.g. 96 288: the curve at 1x and 3x)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE")
    return parser.parse_args()


def run_overrides(run: Path, out: Path) -> list[str]:
    """The demo recipe pointed at a finished demo run's data and SFT adapter, writing to `out`: the PPO stage
    alone, without PPO-ptx or intermediate checkpoints (the benches' common setup)."""
    data = run / "data"
    return [f"output_dir={out}", f"data.prompts.path={data / 'prompts_train.jsonl'}",
            f"data.sft.path={data / 'sft.jsonl'}", f"data.eval.path={data / 'prompts_eval.jsonl'}",
            f"data.ptx.path={data / 'ptx.jsonl'}", f"ppo.sft_adapter={run / 'sft'}", "ppo.ptx_coef=0",
            "ppo.save_steps=1000"]


def demo_recipe(args: argparse.Namespace, out: Path, seed: int):
    from lora_rlhf.recipe.config import load_recipe

    k = args.num_generations or (4 if args.estimator != "gae" else 1)
    overrides = [*run_overrides(args.run, out), f"seed={seed}", f"ppo.total_episodes={args.episodes}",
                 f"ppo.advantage_estimator={args.estimator}", f"ppo.num_generations={k}"]
    # With the RM as the reward, the checker is the gold monitor: logged beside it, never trained on.
    overrides += ([f"ppo.reward_fn={CHECKER}"] if args.reward == "checker"
                  else [f"ppo.reward_adapter={args.run / 'reward'}", f"ppo.gold_fn={CHECKER}"])
    return load_recipe(RECIPE, overrides + args.overrides)


def held_out_prompts(n: int) -> list[str]:
    """n held-out prompts from the demo's own generator, disjoint from its demonstration and RL prompts.

    The demo's data stage draws its training prompts first from a seeded generator, so asking that generator
    for more eval prompts (after the same training draw) gives a larger held-out set of the same kind than the
    32 that `make demo` writes.
    """
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.tasks import demo_data

    demo = load_recipe(RECIPE)
    args = demo.pipeline.data_builder_args
    train_and_eval = demo_data.build_prompts(demo.seed, args["n_demos"] + args["n_train"], n,
                                             args.get("constraint_types"))
    return [row["prompt"] for row in train_and_eval[1]]


def answer_scores(trainer, role: str, prompts: list, seed: int) -> tuple[list[float], dict[str, list[bool]]]:
    """Greedy answers of `role`: strict compliance per prompt, and per constraint type whether it was met."""
    import torch

    from lora_rlhf.core.generation import generate_responses
    from lora_rlhf.tasks import ifeval_lite

    trainer.sb.train(False)
    torch.manual_seed(seed)
    answers = [a[0] for a in generate_responses(trainer.sb, prompts, role, trainer.recipe.eval.max_new_tokens,
                                                temperature=0.0, batch_size=16)]
    scores, met = [], {}
    for p, a in zip(prompts, answers, strict=True):
        specs = ifeval_lite.parse_constraints(p)
        judgement = ifeval_lite.judge(p, a, specs)
        scores.append(judgement.compliance)
        for spec, ok in zip(specs, judgement.met, strict=True):
            met.setdefault(spec["type"], []).append(ok)
    return scores, met


def held_out(reference: tuple, policy: tuple, episodes: int, seed: int) -> dict:
    """The trained policy against the SFT reference on the same held-out prompts: means, the paired gap with
    its bootstrap interval, and compliance per constraint type."""
    from lora_rlhf.stages.eval.evaluate import paired_difference

    diff = paired_difference(policy[0], reference[0], "ppo", "sft", "checker", seed=seed)
    by_type = {t: [statistics.mean(reference[1][t]), statistics.mean(policy[1][t])] for t in sorted(reference[1])}
    return {"episodes": episodes, "sft": statistics.mean(reference[0]), "ppo": statistics.mean(policy[0]),
            "by_type": by_type, **diff}


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    import gc
    import random

    import torch

    from lora_rlhf.core.data import load_prompts
    from lora_rlhf.stages.ppo.roles import resolve_sources
    from lora_rlhf.stages.ppo.trainer import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        recipe = demo_recipe(args, Path(tmp), seed)
        torch.manual_seed(seed)
        random.seed(seed)
        trainer = build_trainer(recipe, resolve_sources(recipe), load_prompts(recipe.data.prompts, seed))
        prompts = held_out_prompts(args.eval_prompts)
        reference = answer_scores(trainer, "reference", prompts, seed)
        marks = sorted(set(args.eval_at or []) | {trainer.num_steps * recipe.ppo.batch_size})
        curve, evaluations, seconds = [], [], 0.0
        for _ in range(trainer.num_steps):
            started = time.perf_counter()
            metrics, _ = trainer.step()
            seconds += time.perf_counter() - started
            curve.append({k: metrics[k] for k in ("step", "objective/scores", "objective/gold", "objective/kl",
                                                  "time/step") if k in metrics})
            gold = f" gold {metrics['objective/gold']:.3f}" if "objective/gold" in metrics else ""
            print(f"  seed {seed} step {metrics['step']}/{trainer.num_steps}: score {metrics['objective/scores']:.3f}"
                  f"{gold} kl {metrics['objective/kl']:.3f} ({metrics['time/step']:.0f} s)", flush=True)
            if metrics["episode"] in marks:
                h = held_out(reference, answer_scores(trainer, "policy", prompts, seed), metrics["episode"], seed)
                evaluations.append(h)
                print(f"  seed {seed} held out after {h['episodes']} episodes: SFT {h['sft']:.3f} RL {h['ppo']:.3f} "
                      f"RL - SFT {h['mean']:+.3f} [{h['low']:+.3f}, {h['high']:+.3f}]", flush=True)
        result = {"seed": seed, "curve": curve, "seconds": seconds, "evaluations": evaluations,
                  "held_out": evaluations[-1]}
        del trainer
        gc.collect()
    return result


def quarter_means(values: list[float]) -> tuple[float, float]:
    q = max(1, len(values) // 4)
    return statistics.mean(values[:q]), statistics.mean(values[-q:])


def main() -> None:
    args = parse_args()
    for need in ("data/prompts_train.jsonl", "data/prompts_eval.jsonl", "sft/lora_rlhf.json") + (
            ("reward/lora_rlhf.json",) if args.reward == "rm" else ()):
        if not (args.run / need).is_file():
            sys.exit(f"{args.run / need} is missing: run `make demo` (or the pipeline's data, sft, compare and "
                     "reward stages) first, or point --run at such a folder")
    print(f"RL alone: {args.episodes} episodes, reward {args.reward}, estimator {args.estimator}, seeds {args.seeds}",
          flush=True)
    results = [run_seed(args, seed) for seed in args.seeds]
    print(f"\n{'seed':>4} | {'score 1st quarter':>17} | {'score last quarter':>18} | {'KL last':>7} | "
          f"{'held-out SFT':>12} | {'held-out RL':>11} | {'RL - SFT [95 % interval]':>26} | {'s':>5}")
    for r in results:
        scores = [c["objective/scores"] for c in r["curve"]]
        first, last = quarter_means(scores)
        h = r["held_out"]
        print(f"{r['seed']:>4} | {first:>17.3f} | {last:>18.3f} | {r['curve'][-1]['objective/kl']:>7.2f} | "
              f"{h['sft']:>12.3f} | {h['ppo']:>11.3f} | {h['mean']:>+8.3f} [{h['low']:+.3f}, {h['high']:+.3f}] | "
              f"{r['seconds']:>5.0f}")
    for r in results:
        if "objective/gold" in r["curve"][0]:
            first, last = quarter_means([c["objective/gold"] for c in r["curve"]])
            print(f"seed {r['seed']} gold (checker) score of the rollouts, first -> last quarter: "
                  f"{first:.3f} -> {last:.3f}")
    for r in results:
        if len(r["evaluations"]) > 1:
            print(f"seed {r['seed']} held-out RL - SFT by episodes: " + ", ".join(
                f"{h['episodes']}: {h['mean']:+.3f} [{h['low']:+.3f}, {h['high']:+.3f}]" for h in r["evaluations"]))
    types = results[0]["held_out"]["by_type"]
    print("\nheld-out strict compliance per constraint type, SFT -> RL:  " + "  ".join(
        f"{t} " + "/".join(f"{r['held_out']['by_type'][t][0]:.2f}->{r['held_out']['by_type'][t][1]:.2f}"
                           for r in results) for t in types))
    if len(results) > 1:
        gains = [r["held_out"]["mean"] for r in results]
        rises = [quarter_means([c["objective/scores"] for c in r["curve"]]) for r in results]
        print(f"over {len(results)} seeds: held-out RL - SFT {statistics.mean(gains):+.3f} "
              f"(min {min(gains):+.3f}, max {max(gains):+.3f}); reward rise last - first quarter "
              f"{statistics.mean(b - a for a, b in rises):+.3f}")
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}), file=sys.stderr)


if __name__ == "__main__":
    main()
