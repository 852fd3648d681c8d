"""Does the reward model learn from the demo's rankings, and what does it need? The reward stage alone, trained
under different settings on rankings of the demo's own kind, each judged on one fixed held-out set.

    python bench/bench_reward_learning.py --run runs/demo                      # the default grid
    python bench/bench_reward_learning.py --run runs/demo --only demo lr-1e-3 --seeds 0 1 2
    python bench/bench_reward_learning.py --run runs/demo --markdown docs/results/reward_learning.md

`--run` is the output folder of `make demo` with at least its data and sft stages. Once per run folder the bench
ranks a pool of prompts the way the demo's compare stage does (the SFT adapter samples `--pool-k` responses per
prompt with the recipe's compare settings; the IFEval-lite checker scores them), cached in RUN/bench_reward/:
    pool.jsonl      the demo's own RL prompts first, then more from the same generator (training material)
    heldout.jsonl   `--heldout` prompts from the same generator, drawn after every prompt a demo run can use
                    (demo builder's n_demos + n_train <= POOL_LIMIT), so no demo run ever trains on them
Each setting then takes the first `prompts` prompts of the pool and the first `k` responses of each (the same
generation budget spent on more prompts or on larger K), runs the library's reward stage (run_reward) with the
demo recipe plus the setting's overrides, and reads what it wrote: held-out pairwise accuracy with its 95 %
interval (resampling prompts), accuracy per constraint type, the logged training loss, and the cost in seconds
of the compare and reward stages that produced it (compare's at the pool's measured seconds per response).
This is a measurement, not a test: it prints a table (and writes it as markdown with --markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "demo_smollm2_cpu.yaml"
CHECKER = "lora_rlhf.tasks.ifeval_lite:rank"
POOL_LIMIT = 1024  # prompts after the SFT demonstrations that a demo run may rank or roll out; held-out ones follow


@dataclass
class Setting:
    prompts: int = 64
    """Ranked prompts it trains on (the first of the pool)."""
    k: int = 6
    """Responses ranked per prompt (the first k of each prompt's pool samples)."""
    overrides: list[str] = field(default_factory=list)
    """Recipe overrides on top of the demo recipe (reward.* mostly)."""
    types: list[str] | None = None
    """Only prompts whose constraints are all of these types (training and held-out alike)."""
    min_gap: float = 0.0
    """Scores closer than this count as a tie (no pair): near-ties left out of training."""


# The grid: the demo's setting at the time this bench was written, then one axis at a time.
SETTINGS: dict[str, Setting] = {
    "demo-before": Setting(64, 6, ["reward.learning_rate=2e-4", "reward.num_train_epochs=1"]),
    "epochs-3": Setting(64, 6, ["reward.learning_rate=2e-4", "reward.num_train_epochs=3"]),
    "lr-1e-3": Setting(64, 6, ["reward.learning_rate=1e-3", "reward.num_train_epochs=1"]),
    "head-lr-1e-2": Setting(64, 6, ["reward.learning_rate=2e-4", "reward.head_learning_rate=1e-2"]),
    "prompts-128-k3": Setting(128, 3, ["reward.learning_rate=2e-4"]),
    "prompts-192": Setting(192, 6, ["reward.learning_rate=2e-4"]),
    "from-base": Setting(64, 6, ["reward.learning_rate=2e-4", "reward.init_adapter=none"]),
    "min-gap-0.5": Setting(64, 6, ["reward.learning_rate=2e-4"], min_gap=0.5),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="a demo run with data and sft")
    parser.add_argument("--only", nargs="*", default=None, help=f"settings to run (default all: {list(SETTINGS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="recipe seeds (RM init and order)")
    parser.add_argument("--pool", type=int, default=256, help="training prompts ranked into the pool")
    parser.add_argument("--pool-k", type=int, default=8, help="responses sampled per pool prompt")
    parser.add_argument("--heldout", type=int, default=48, help="held-out prompts (K = 6 responses each)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                        help="extra recipe overrides for every setting")
    parser.add_argument("--custom", action="append", default=[], metavar="NAME:PROMPTS:K:OVERRIDE,OVERRIDE",
                        help="an extra setting, e.g. 'lr5e-4-e2:128:6:reward.learning_rate=5e-4,"
                             "reward.num_train_epochs=2' (also types=a+b and gap=0.5 as overrides)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep each trained reward model as DIR/<setting>-seed<N> (e.g. for bench_rl_learning)")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------- the ranked pool
def demo_recipe(overrides: list[str]):
    from lora_rlhf.recipe.config import load_recipe

    return load_recipe(RECIPE, overrides)


def pool_prompts(n_pool: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """(pool rows, held-out rows) from the demo's generator: the pool starts with the demo's own RL prompts."""
    from lora_rlhf.tasks import demo_data

    recipe = demo_recipe([])
    args = recipe.pipeline.data_builder_args
    n_demos = args["n_demos"]
    if n_pool > POOL_LIMIT:
        sys.exit(f"--pool {n_pool} is more than POOL_LIMIT ({POOL_LIMIT}), where the held-out prompts begin")
    rows, _ = demo_data.build_prompts(recipe.seed, n_demos + POOL_LIMIT + n_heldout, 0,
                                      args.get("constraint_types"))
    return rows[n_demos:n_demos + n_pool], rows[n_demos + POOL_LIMIT:]


def rank_prompts(run: Path, rows: list[dict], k: int, folder: Path) -> tuple[Path, float]:
    """Sample and rank `rows` with the demo's compare stage (SFT adapter, checker); (rankings file, seconds)."""
    from lora_rlhf.core.io import write_jsonl_atomic
    from lora_rlhf.stages.compare import RANKINGS, run_compare

    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "prompts.jsonl"
    write_jsonl_atomic(prompts, rows)
    recipe = demo_recipe([f"output_dir={folder}", f"data.prompts.path={prompts}", f"compare.k={k}",
                          f"compare.adapter={run / 'sft'}", f"compare.labeler={CHECKER}"])
    started = time.perf_counter()
    out = run_compare(recipe)
    return out / RANKINGS, time.perf_counter() - started


def ranked_pool(args: argparse.Namespace) -> tuple[list[dict], list[dict], float]:
    """(pool ranking lines, held-out ranking lines, seconds per sampled response): built once, then cached."""
    from lora_rlhf.core.io import read_jsonl, write_json_atomic

    cache = args.run / "bench_reward"
    info_path = cache / "pool.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    wanted = {"pool": args.pool, "pool_k": args.pool_k, "heldout": args.heldout}
    if info.get("wanted") != wanted:
        pool_rows, held_rows = pool_prompts(args.pool, args.heldout)
        print(f"ranking the pool: {len(pool_rows)} prompts x {args.pool_k} and {len(held_rows)} held-out x 6 "
              "(once per run folder)", flush=True)
        pool_file, pool_s = rank_prompts(args.run, pool_rows, args.pool_k, cache / "pool")
        held_file, _ = rank_prompts(args.run, held_rows, 6, cache / "heldout")
        info = {"wanted": wanted, "pool": str(pool_file), "heldout": str(held_file),
                "seconds_per_response": pool_s / (len(pool_rows) * args.pool_k)}
        write_json_atomic(info_path, info)
    pool = [row for _, row in read_jsonl(Path(info["pool"]))]
    held = [row for _, row in read_jsonl(Path(info["heldout"]))]
    return pool, held, info["seconds_per_response"]


def types_of(row: dict) -> list[str]:
    from lora_rlhf.tasks import ifeval_lite

    return [spec["type"] for spec in ifeval_lite.parse_constraints(row["prompt"])]


def subset(rows: list[dict], setting: Setting, limit_prompts: bool = True) -> list[dict]:
    """The setting's training (or held-out) lines: first prompts, first k responses, near-ties merged."""
    chosen = [r for r in rows if setting.types is None or set(types_of(r)) <= set(setting.types)]
    if limit_prompts:
        chosen = chosen[:setting.prompts]
    out = []
    for row in chosen:
        k = setting.k if limit_prompts else len(row["responses"])
        scores = row["scores"][:k]
        if setting.min_gap > 0:
            scores = _merge_near_ties(scores, setting.min_gap)
        if len(set(scores)) < 2:
            continue  # all tied: no comparison
        out.append({**row, "responses": row["responses"][:k], "scores": scores})
    return out


def _merge_near_ties(scores: list[float], gap: float) -> list[float]:
    """Scores closer than `gap` to the previous distinct value (in sorted order) take that value: no pair."""
    merged: dict[float, float] = {}
    anchor = None
    for s in sorted(set(scores)):
        if anchor is None or s - anchor >= gap:
            anchor = s
        merged[s] = anchor
    return [merged[s] for s in scores]


# ---------------------------------------------------------------------------------------------- one setting
def parse_custom(spec: str) -> tuple[str, Setting]:
    name, prompts, k, *rest = spec.split(":")
    overrides, types, gap = [], None, 0.0
    for item in ",".join(rest).split(",") if rest else []:
        if item.startswith("types="):
            types = item.split("=", 1)[1].split("+")
        elif item.startswith("gap="):
            gap = float(item.split("=", 1)[1])
        elif item:
            overrides.append(item)
    return name, Setting(int(prompts), int(k), overrides, types, gap)


def run_setting(name: str, setting: Setting, seed: int, args: argparse.Namespace, pool: list[dict],
                held: list[dict], seconds_per_response: float) -> dict:
    """Train one reward model in a fresh process (clean memory and RNG); return what the stage reported."""
    from lora_rlhf.core.io import write_jsonl_atomic

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = subset(pool, setting)
        heldout = subset(held, setting, limit_prompts=False)
        write_jsonl_atomic(work / "train.jsonl", train)
        write_jsonl_atomic(work / "heldout.jsonl", heldout)
        init = [o for o in setting.overrides if o.startswith("reward.init_adapter=")]
        overrides = [f"output_dir={work / 'out'}", f"seed={seed}", f"data.reward.path={work / 'train.jsonl'}",
                     f"data.reward_eval.path={work / 'heldout.jsonl'}", f"data.sft.path={args.run / 'data/sft.jsonl'}",
                     "reward.normalize=false", "reward.save_steps=100000"]
        overrides += [o for o in setting.overrides if not o.startswith("reward.init_adapter=")]
        if init and init[0].split("=", 1)[1] in ("none", "null", ""):
            overrides.append("reward.init_adapter=null")
        else:
            overrides.append(f"reward.init_adapter={args.run / 'sft'}")
        overrides += args.overrides
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides)], capture_output=True,
                              text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"setting {name} failed:\n{proc.stderr[-3000:]}")
        out = work / "out" / "reward"
        metrics = json.loads((out / "metrics.json").read_text())
        losses = [json.loads(line.split(" INFO ", 1)[1]) for line in (out / "train.log").read_text().splitlines()
                  if ' INFO {"step"' in line]
        curve = [(r["step"], r["loss"]) for r in losses if "loss" in r]
        by_type = accuracy_by_type(out / "eval_pairs.jsonl", heldout)
        if args.keep is not None:
            import shutil

            kept = args.keep / f"{name}-seed{seed}"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(out, kept, ignore=shutil.ignore_patterns("checkpoints"))
    # Every ranked prompt cost its generation, also those whose K responses all tied (no pair).
    ranked = len([r for r in pool if setting.types is None or set(types_of(r)) <= set(setting.types)]
                 [:setting.prompts])
    n_responses = ranked * setting.k
    return {"name": name, "seed": seed, "prompts": ranked, "prompts_with_pairs": len(train), "k": setting.k, "overrides": setting.overrides,
            "types": setting.types, "min_gap": setting.min_gap, "train_pairs": metrics["train_pairs"],
            "accuracy": metrics["eval_pairwise_accuracy"], "low": metrics["eval_pairwise_accuracy_low"],
            "high": metrics["eval_pairwise_accuracy_high"], "eval_pairs": metrics["eval_pairs"],
            "eval_prompts": metrics["eval_prompts"], "eval_loss": metrics["eval_pairwise_loss"],
            "train_loss": metrics.get("train_loss"), "curve": curve, "by_type": by_type,
            "reward_seconds": metrics["wall_seconds"], "stage_seconds": seconds,
            "compare_seconds": n_responses * seconds_per_response}


def accuracy_by_type(pairs_file: Path, heldout: list[dict]) -> dict[str, float]:
    """Held-out accuracy over the pairs of prompts that ask for each constraint type."""
    from lora_rlhf.core.io import read_jsonl

    hits: dict[str, list[bool]] = {}
    for _, pair in read_jsonl(pairs_file):
        for ctype in types_of(heldout[pair["line"] - 1]):
            hits.setdefault(ctype, []).append(pair["correct"])
    return {t: statistics.mean(v) for t, v in sorted(hits.items())}


def child(overrides: list[str]) -> None:
    from lora_rlhf.stages.reward import run_reward

    run_reward(demo_recipe(overrides))


# ---------------------------------------------------------------------------------------------- report
def table(results: list[dict], command: str) -> str:
    types = sorted({t for r in results for t in r["by_type"]})
    head = (["setting", "seed", "ranked prompts x K (with a pair)", "train pairs", "held-out accuracy [95 %]", "held-out loss",
             "train loss (first -> last logged)"] + types + ["compare s", "reward s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        curve = r["curve"]
        loss = f"{curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else "-"
        cells = [r["name"], str(r["seed"]), f"{r['prompts']} x {r['k']} ({r['prompts_with_pairs']})",
                 str(r["train_pairs"]),
                 f"{100 * r['accuracy']:.1f} [{100 * r['low']:.1f}, {100 * r['high']:.1f}]", f"{r['eval_loss']:.3f}",
                 loss] + [f"{100 * r['by_type'][t]:.0f}" if t in r["by_type"] else "-" for t in types] + [
                 f"{r['compare_seconds']:.0f}", f"{r['reward_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    first = results[0] if results else {}
    note = (f"Held out: {first.get('eval_pairs')} pairs from {first.get('eval_prompts')} prompts (the settings with "
            "a constraint filter use its subset). Accuracy per type: over the held-out pairs of prompts asking for "
            "it (a two-constraint prompt counts for both).")
    return f"`{command}`\n\n" + "\n".join(lines) + "\n\n" + note + "\n"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    args = parse_args()
    if not (args.run / "sft" / "lora_rlhf.json").is_file():
        sys.exit(f"{args.run}/sft is not a finished SFT stage: run `make demo` (at least its data and sft stages) "
                 "or point --run at such a folder")
    settings = dict(SETTINGS)
    settings.update(parse_custom(spec) for spec in args.custom)
    names = args.only if args.only is not None else list(settings)
    unknown = [n for n in names if n not in settings]
    if unknown:
        sys.exit(f"unknown settings {unknown}; known: {list(settings)} (or add one with --custom)")
    pool, held, per_response = ranked_pool(args)
    print(f"pool: {len(pool)} prompts x {len(pool[0]['responses'])}; held out: {len(held)} prompts; "
          f"{per_response:.3f} s per sampled response", flush=True)
    results = []
    for name in names:
        for seed in args.seeds:
            if settings[name].prompts > len(pool):
                sys.exit(f"setting {name} wants {settings[name].prompts} prompts; the pool has {len(pool)} (--pool)")
            r = run_setting(name, settings[name], seed, args, pool, held, per_response)
            results.append(r)
            print(f"{name} seed {seed}: {100 * r['accuracy']:.1f} % [{100 * r['low']:.1f}, {100 * r['high']:.1f}] on "
                  f"{r['eval_pairs']} pairs / {r['eval_prompts']} prompts; {r['train_pairs']} train pairs; "
                  f"reward {r['reward_seconds']:.0f} s; by type {r['by_type']}", flush=True)
    command = "python bench/bench_reward_learning.py " + " ".join(sys.argv[1:])
    text = table(results, command)
    print("\n" + text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        args.markdown.write_text(f"# Reward model learning (bench_reward_learning.py, commit {commit})\n\n{text}")
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
