"""PPO on 1 and on 2 data-parallel ranks (torchrun, gloo on the CPU): episodes/s, peak memory, per-phase time.

    python bench/bench_ppo_ranks.py [--ranks 1 2] [--steps 3] [--batch-size 16] [--response-length 32]

The 135M embedded base in 4-bit, the demo's PPO settings (GAE, 2 epochs x 2 mini-batches), the programmatic
checker as the reward (no reward adapter needed), prompts from the demo's generator. Every run gets the same
cores (OMP threads = cores / ranks), so on a 2-core machine 2 ranks cannot be faster than 1: this measures
what data parallelism costs on top of the work, and that the ranks really ran (run.json's world size).
The first step is a warm-up and is left out of the means.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "demo_smollm2_cpu.yaml"
CHECKER = "lora_rlhf.tasks.ifeval_lite:reward"


def run(ranks: int, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"ranks{ranks}"
    overrides = [f"output_dir={out}", f"data.prompts.path={work / 'prompts.jsonl'}", f"ppo.reward_fn={CHECKER}",
                 f"ppo.total_episodes={args.batch_size * args.steps}", f"ppo.batch_size={args.batch_size}",
                 f"ppo.local_rollout_forward_batch_size={args.batch_size // ranks}",
                 f"ppo.response_length={args.response_length}", "ppo.ptx_coef=0", "ppo.save_steps=1000"]
    threads = max(1, (os.cpu_count() or 2) // ranks)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "lora_rlhf_cli.main", "ppo", str(RECIPE)] + [a for o in overrides for a in ("--set", o)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    world = json.loads((out / "ppo" / "run.json").read_text())["world_size"]
    from lora_rlhf.core.io import read_jsonl

    steps = [row for _, row in read_jsonl(out / "ppo" / "metrics.jsonl", "PPO log")][1:]
    mean = lambda key: statistics.mean(s[key] for s in steps)  # noqa: E731
    return {"ranks": world, "threads": threads, "episodes/s": mean("episodes/s"), "step_s": mean("time/step"),
            "gen_s": mean("time/generation"), "score_s": mean("time/scoring"), "opt_s": mean("time/optimisation"),
            "peak_gb": max(s["memory/peak_gb"] for s in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--response-length", type=int, default=32)
    args = parser.parse_args()
    from lora_rlhf.tasks.demo_data import build_prompts

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, _ = build_prompts(0, 64, 0)
        (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        rows = [run(r, args, work) for r in args.ranks]
    print(f"PPO, SmolLM2-135M 4-bit, batch {args.batch_size}, {args.response_length}-token responses, "
          f"{args.steps - 1} timed steps (after 1 warm-up), {os.cpu_count()} cores")
    print(f"{'ranks':>5} {'threads/rank':>12} {'episodes/s':>10} {'step s':>7} {'gen s':>6} {'score s':>7} "
          f"{'opt s':>6} {'peak GB/rank':>12}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['threads']:>12} {r['episodes/s']:>10.3f} {r['step_s']:>7.1f} {r['gen_s']:>6.1f} "
              f"{r['score_s']:>7.1f} {r['opt_s']:>6.1f} {r['peak_gb']:>12.2f}")


if __name__ == "__main__":
    main()
