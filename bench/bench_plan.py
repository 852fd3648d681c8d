"""The memory planner against measurement: predicted vs measured peak of real stages on the CPU.

    python bench/bench_plan.py                 # every configuration (~40 min on 2 cores)
    python bench/bench_plan.py --only sft-135m-4bit ppo-anchor
    python bench/bench_plan.py --repeat 3      # each configuration 3 times, judged on the median
    python bench/bench_plan.py --device cuda --model meta-llama/Llama-3.1-8B-Instruct   # validate on a GPU
    python bench/bench_plan.py --device cuda --only ppo-anchor --strict   # exit 1 when the target is not met

Each configuration runs the library's own stage code (run_sft, run_reward, run_dpo, the PPO trainer's steps,
generation) on the embedded SmolLM2-135M or a tiny Llama, in its own subprocess so that high-water marks do not
mix. The measurement is the resident-set high-water mark over the stage (VmHWM after resetting it through
/proc/self/clear_refs once the libraries are imported: lora_rlhf.plan.preflight.reset_peak / peak_bytes);
on CUDA the measurement is torch.cuda.max_memory_reserved over the stage (the caching allocator's peak: what
meets the free memory), compared with the prediction minus its CUDA-context part (which that counter does not
see); max_memory_allocated is printed beside it, against the prediction less its allocator headroom too. The prediction is `lora-rlhf plan` on the same recipe,
with the prompt length the data really has. Sequences are made exactly as long as the recipe's max_length (SFT
and ptx texts are cut there; reward pairs are built to that length; PPO responses never stop early), so the
plan's upper bound is the real length.

Target (issue 14): every prediction within +-15 % of the measurement, never under by more than 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBEDDED = "smollm2-135m-instruct"
WORDS = ("the river carries light stones down from the hills while birds watch and the wind turns the "
         "leaves over in quiet circles near the old mill").split()
PROMPTS = ["Write a haiku about rain.", "Explain photosynthesis to a child.", "Give me three tips for sleeping well.",
           "What is the capital of France?", "Summarise the plot of Hamlet in two sentences.",
           "How do I boil an egg?", "Name a prime number larger than 100.", "Why is the sky blue?"]

# name -> (stage, model: "135m" | "tiny", recipe overrides)
CONFIGS: dict[str, tuple[str, str, list[str]]] = {
    "sft-tiny-4bit": ("sft", "tiny", ["quantization.mode=4bit", "sft.per_device_train_batch_size=8",
                                      "sft.max_length=256"]),
    "sft-135m-4bit": ("sft", "135m", ["quantization.mode=4bit", "sft.per_device_train_batch_size=4",
                                      "sft.max_length=128"]),
    "sft-135m-fp32-ckpt": ("sft", "135m", ["quantization.mode=none", "model.gradient_checkpointing=true",
                                           "sft.per_device_train_batch_size=4", "sft.max_length=256"]),
    "reward-135m-4bit": ("reward", "135m", ["quantization.mode=4bit", "reward.per_device_train_batch_size=4",
                                            "reward.max_length=96"]),
    # DPO (TRL's DPOTrainer, policy + reference adapters on one base): pairs exactly max_length tokens long
    "dpo-135m-4bit": ("dpo", "135m", ["quantization.mode=4bit", "dpo.per_device_train_batch_size=4",
                                      "dpo.max_length=96", "reward.max_length=96"]),
    "compare-135m-4bit": ("compare", "135m", ["quantization.mode=4bit", "compare.batch_size=4", "compare.k=2",
                                              "compare.max_new_tokens=48"]),
    "eval-135m-4bit": ("eval", "135m", ["quantization.mode=4bit", "eval.batch_size=16", "eval.max_new_tokens=48",
                                        "eval.temperature=0"]),
    "ppo-anchor": ("ppo", "135m", ["quantization.mode=4bit", "ppo.batch_size=8", "ppo.response_length=48",
                                   "ppo.num_ppo_epochs=2", "ppo.local_rollout_forward_batch_size=8"]),
    "ppo-anchor-ckpt": ("ppo", "135m", ["quantization.mode=4bit", "model.gradient_checkpointing=true",
                                        "ppo.batch_size=8", "ppo.response_length=48", "ppo.num_ppo_epochs=2",
                                        "ppo.local_rollout_forward_batch_size=8"]),
    "ppo-135m-4bit-ckpt": ("ppo", "135m", ["quantization.mode=4bit", "model.gradient_checkpointing=true",
                                           "ppo.batch_size=8", "ppo.response_length=32", "ppo.num_ppo_epochs=1"]),
    "ppo-135m-fp32-mb4": ("ppo", "135m", ["quantization.mode=none", "ppo.batch_size=8", "ppo.num_mini_batches=2",
                                          "ppo.response_length=32", "ppo.num_ppo_epochs=1",
                                          "ppo.local_rollout_forward_batch_size=4"]),
    # the demo's PPO settings, without and with PPO-ptx's LM loss on 4 text rows of ptx_max_length tokens
    "ppo-135m-4bit-mb8": ("ppo", "135m", ["quantization.mode=4bit", "ppo.batch_size=16", "ppo.num_mini_batches=2",
                                          "ppo.response_length=48", "ppo.num_ppo_epochs=2",
                                          "ppo.local_rollout_forward_batch_size=16"]),
    "ppo-ptx-135m-4bit-mb8": ("ppo-ptx", "135m", ["quantization.mode=4bit", "ppo.batch_size=16",
                                                  "ppo.num_mini_batches=2", "ppo.response_length=48",
                                                  "ppo.num_ppo_epochs=2", "ppo.local_rollout_forward_batch_size=16",
                                                  "ppo.ptx_coef=0.2", "ppo.ptx_batch_size=4",
                                                  "ppo.ptx_max_length=160"]),
    "ppo-ptx-135m-4bit-long": ("ppo-ptx", "135m", ["quantization.mode=4bit", "ppo.batch_size=8",
                                                   "ppo.response_length=32", "ppo.num_ppo_epochs=1",
                                                   "ppo.ptx_coef=0.2", "ppo.ptx_batch_size=4",
                                                   "ppo.ptx_max_length=384"]),
    "ppo-tiny-rloo": ("ppo", "tiny", ["quantization.mode=none", "ppo.batch_size=16", "ppo.response_length=64",
                                      "ppo.advantage_estimator=rloo", "ppo.num_generations=4",
                                      "ppo.num_ppo_epochs=1"]),
}
# Configurations above again, each prompt padded to this many tokens (as generation sees them): at and past the
# preflight's 128-token floor, where PPO's rows are long enough to hold more heap per token on the CPU.
LONG_PROMPTS = {"ppo-anchor-prompt128": ("ppo-anchor", 128), "ppo-anchor-prompt192": ("ppo-anchor", 192),
                "ppo-anchor-ckpt-prompt192": ("ppo-anchor-ckpt", 192),
                "ppo-135m-fp32-mb4-prompt128": ("ppo-135m-fp32-mb4", 128)}
CONFIGS.update({name: CONFIGS[like] for name, (like, _) in LONG_PROMPTS.items()})


# ---------------------------------------------------------------------------------------------- child side
def base_recipe(work: Path, model: str, device: str = "cpu") -> dict:
    return {"output_dir": str(work / "run"), "seed": 0,
            "model": {"name": model, "device": device, "dtype": "fp32" if device == "cpu" else "auto"},
            "quantization": {"mode": "4bit"}, "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "sft": {"max_steps": 2, "logging_steps": 1, "save_strategy": "no"},
            "reward": {"max_steps": 2, "logging_steps": 1, "save_strategy": "no", "normalize": False,
                       "group_by_prompt": False},
            "dpo": {"max_steps": 2, "logging_steps": 1, "save_strategy": "no",
                    "sft_adapter": str(work / "sft-adapter")},
            "ppo": {"sft_adapter": str(work / "sft-adapter"), "reward_adapter": str(work / "reward-adapter"),
                    "stop_token": None, "learning_rate": 1e-5, "save_steps": 1000}}


def bench_prompts(name: str, tokenizer) -> list[str]:
    """The configuration's prompts: PROMPTS, or each padded to its LONG_PROMPTS length."""
    from lora_rlhf.core.text import prompt_ids

    if name not in LONG_PROMPTS:
        return PROMPTS

    def ids(tok, prompt: str, words: str) -> list[int]:
        return prompt_ids(tok, f"{prompt} Context: {words}")

    return [f"{p} Context: {_to_length(tokenizer, ids, p, LONG_PROMPTS[name][1], i)}" for i, p in enumerate(PROMPTS)]


def write_data(work: Path, tokenizer, recipe, prompts: list[str]) -> int:
    """Data for the stage; returns the prompt length in tokens the plan should assume."""
    from lora_rlhf.core.text import encode, prompt_ids

    rows = [{"text": " ".join(WORDS * 40)} for _ in range(32)]  # longer than any max_length: cut there
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "ptx.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # cut at ppo.ptx_max_length
    # Reward pairs exactly reward.max_length tokens long (the plan's upper bound is then the real length).
    length = recipe.trainer_args.get("reward", {}).get("max_length", 96)
    pairs = []
    for i in range(16):
        prompt = f"Describe place number {i}."
        chosen, rejected = _to_length(tokenizer, encode, prompt, length, i), _to_length(tokenizer, encode, prompt,
                                                                                        length, i + 100)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (work / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts * 2))
    return max(len(prompt_ids(tokenizer, p)) for p in prompts)


def _to_length(tokenizer, encode, prompt: str, length: int, seed: int) -> str:
    words = [WORDS[(seed + k) % len(WORDS)] for k in range(length)]
    while len(encode(tokenizer, prompt, " ".join(words))) > length:
        words.pop()
    return " ".join(words)


def prepare_adapters(work: Path, model: str, device: str = "cpu") -> None:
    """Random (fixed) SFT and reward adapters for PPO, written once per model."""
    import torch

    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

    quant = QuantizationConfig(mode="4bit" if device == "cuda" else "none")
    sb = SharedBase.load(ModelConfig(name=model, device=device), quant, for_training=False)
    lora = LoraSettings(r=16, alpha=32, dropout=0.0)
    torch.manual_seed(0)
    sb.add_adapter("policy", lora)
    sb.add_adapter("reward", lora)
    sb.add_head("reward")
    sb.save_adapter("policy", work / "sft-adapter", stage="sft")
    sb.save_adapter("reward", work / "reward-adapter", stage="reward", reward_offset=0.0)


def child(name: str, work: Path, model: str, device_type: str = "cpu") -> dict:
    import torch

    import lora_rlhf.stages.dpo  # noqa: F401 - libraries count in the runtime, imported before the reset
    import lora_rlhf.stages.ppo.trainer  # noqa: F401
    import lora_rlhf.stages.reward  # noqa: F401
    import lora_rlhf.stages.sft  # noqa: F401
    from lora_rlhf.core.loading import load_tokenizer
    from lora_rlhf.plan.model_shape import load_shape
    from lora_rlhf.plan.preflight import peak_bytes, peak_reserved_bytes, reset_peak
    from lora_rlhf.plan.recipe_plan import PlanContext, stage_estimate
    from lora_rlhf.recipe.config import recipe_from_dict

    torch.set_num_threads(1)
    stage, _, overrides = CONFIGS[name]
    raw = base_recipe(work, model, device_type)
    raw["data"] = {"sft": {"path": str(work / "sft.jsonl")}, "reward": {"path": str(work / "pairs.jsonl")},
                   "prompts": {"path": str(work / "prompts.jsonl")}, "eval": {"path": str(work / "eval_prompts.jsonl")},
                   "ptx": {"path": str(work / "ptx.jsonl")}}
    raw["eval"] = {"general_text": str(work / "sft.jsonl")}  # texts longer than eval.general_max_tokens: scored at 256
    recipe = recipe_from_dict(raw, overrides)
    tokenizer = load_tokenizer(recipe.model)
    prompts = bench_prompts(name, tokenizer)
    prompt_length = write_data(work, tokenizer, recipe, prompts)
    predicted = stage_estimate(recipe, stage, load_shape(model), PlanContext(device_type, prompt_length))
    device = torch.device(device_type)
    reset_peak(device)
    started = time.perf_counter()
    run_stage(stage, recipe, prompts)
    peak = peak_bytes(device)  # resident set on the CPU, allocated tensors on CUDA
    parts = {p.name: p.bytes for p in predicted.peak_phase.parts}
    context = parts.get("runtime", 0) if device_type == "cuda" else 0
    result = {"name": name, "stage": stage, "measured": peak, "predicted": predicted.peak - context,
              "phase": predicted.peak_phase.name, "seconds": time.perf_counter() - started, "parts": parts}
    if device_type == "cuda":  # the reserved peak against the whole prediction; the allocated one without headroom
        result.update(measured=peak_reserved_bytes(device), allocated=peak,
                      predicted_allocated=predicted.peak - context - parts.get("allocator headroom", 0))
    return result


def run_stage(stage: str, recipe, prompts: list[str]) -> None:
    if stage == "sft":
        from lora_rlhf.stages.sft import run_sft

        run_sft(recipe)
    elif stage == "reward":
        from lora_rlhf.stages.reward import run_reward

        run_reward(recipe)
    elif stage == "dpo":  # from the (random, fixed) SFT adapter, on reward's pairs
        from lora_rlhf.stages.dpo import run_dpo

        run_dpo(recipe)
    elif stage == "eval":  # one policy (the SFT adapter) against itself as reference, the RM, perplexity
        from lora_rlhf.stages.eval.evaluate import Policy, run_eval

        run_eval(recipe, [Policy("sft", Path(recipe.ppo.sft_adapter))], out_dir=Path(recipe.output_dir) / "eval")
    elif stage == "compare":  # what `compare` does: the base for inference + one adapter, K samples per prompt
        from lora_rlhf.core.base import SharedBase
        from lora_rlhf.core.generation import generate_ids

        sb = SharedBase.load(recipe.model, recipe.quantization, for_training=False)
        sb.load_adapter("policy", recipe.ppo.sft_adapter)
        c = recipe.compare
        generate_ids(sb, prompts[:c.batch_size], "policy", c.max_new_tokens, c.temperature, c.top_p,
                     num_return_sequences=c.k, batch_size=c.batch_size)
    else:
        from lora_rlhf.core.loading import load_tokenizer
        from lora_rlhf.stages.ppo.ptx import PtxData, load_ptx_rows
        from lora_rlhf.stages.ppo.roles import resolve_sources
        from lora_rlhf.stages.ppo.trainer import build_trainer

        ptx = PtxData.build(load_ptx_rows(recipe.data.ptx, recipe.seed), load_tokenizer(recipe.model),
                            recipe.ppo.ptx_max_length, recipe.seed) if stage == "ppo-ptx" else None
        trainer = build_trainer(recipe, resolve_sources(recipe), (prompts * 4)[:recipe.ppo.batch_size], ptx)
        for _ in range(2):  # the second step runs with AdamW's state allocated
            trainer.step()


# ---------------------------------------------------------------------------------------------- parent side
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run only these configurations")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the stages run")
    parser.add_argument("--model", dest="big_model", default=EMBEDDED,
                        help="the base of the non-tiny configurations (a Hub id works with Hub access)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure each configuration N times (fresh processes) and judge the median: a CPU's "
                             "resident-set peak varies ~15-20 %% between identical runs (glibc's heap)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is not met (bench/gpu_check.sh)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "prepare":
        prepare_adapters(Path(args.work), args.child_model, args.device)
        return
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.work), args.child_model, args.device)), flush=True)
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.big_model == EMBEDDED:
        env["HF_HUB_OFFLINE"] = "1"  # the embedded model needs no network; never wait on one
    names = args.only or list(CONFIGS)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        models = {"135m": args.big_model, "tiny": str(build_tiny(Path(tmp) / "tiny-model"))}
        for key, model in models.items():
            work = Path(tmp) / key
            work.mkdir()
            if any(CONFIGS[n][1] == key and CONFIGS[n][0] in ("ppo", "ppo-ptx", "compare", "eval", "dpo")
                   for n in names):
                _run([sys.executable, __file__, "--child", "prepare", "--work", str(work), "--child-model", model,
                      "--device", args.device], env)
        for name in names:
            stage, key, _ = CONFIGS[name]
            work = Path(tmp) / key
            for _ in range(max(1, args.repeat)):
                out = _run([sys.executable, __file__, "--child", name, "--work", str(work), "--child-model",
                            models[key], "--device", args.device], env)
                results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
                r = results[-1]
                print(f"[{name}: {r['seconds']:.0f} s, {r['measured'] / 2**30:.2f}G]", file=sys.stderr, flush=True)
    if not report(results) and args.strict:
        sys.exit(1)


def build_tiny(folder: Path) -> Path:
    """The test suite's tiny Llama (tests/helpers.py), 4 layers: a model whose vocabulary dominates."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import build_tiny_model

    return build_tiny_model(folder, num_hidden_layers=4)


def _run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[2:5])} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def report(results: list[dict]) -> bool:
    """One row per configuration: the prediction against the median of its runs (and their range when repeated);
    on CUDA also the allocated peak against the prediction without its allocator headroom. True when the target
    is met."""
    runs: dict[str, list[dict]] = {}
    for r in results:
        runs.setdefault(r["name"], []).append(r)
    print(f"\n{'configuration':22} {'stage':8} {'peak phase':13} {'predicted':>10} {'measured':>10} {'error':>8}"
          f"  {'runs (min-max)':>16}")
    worst_over, worst_under = 0.0, 0.0
    for name, rs in runs.items():
        measured = sorted(r["measured"] for r in rs)
        median = statistics.median(measured)
        r = rs[0]
        err = r["predicted"] / median - 1
        worst_over, worst_under = max(worst_over, err), min(worst_under, err)
        spread = f"{len(rs)}: {measured[0] / 2**30:.2f}-{measured[-1] / 2**30:.2f}G" if len(rs) > 1 else ""
        print(f"{name:22} {r['stage']:8} {r['phase']:13} {r['predicted'] / 2**30:9.2f}G "
              f"{median / 2**30:9.2f}G {err:+8.1%}  {spread:>16}")
        if "allocated" in r:
            allocated = statistics.median(x["allocated"] for x in rs)
            print(f"{'':22} {'':8} {'allocated':13} {r['predicted_allocated'] / 2**30:9.2f}G "
                  f"{allocated / 2**30:9.2f}G {r['predicted_allocated'] / allocated - 1:+8.1%}")
    ok = worst_over <= 0.15 and worst_under >= -0.10
    print(f"\nworst: {worst_over:+.1%} over, {worst_under:+.1%} under; target within +-15 %, never under by more "
          f"than 10 %: {'met' if ok else 'NOT met'}")
    return ok


if __name__ == "__main__":
    main()
