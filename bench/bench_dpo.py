"""DPO speed and memory: ours on the shared 4-bit base vs TRL's DPOTrainer with a separately loaded reference.

    python bench/bench_dpo.py                                   # embedded SmolLM2-135M, CPU, 8 timed steps
    python bench/bench_dpo.py --device cuda --model meta-llama/Llama-3.1-8B-Instruct --max-length 1024
    python bench/bench_dpo.py --model tiny --steps 2 --warmup 0 --repeats 1    # a smoke run (tests' tiny Llama)

Both train the same policy (a LoRA initialised from one SFT adapter) on the same preference pairs with the same
DPOConfig arguments, one after the other, each in a fresh subprocess so that its peak memory is its own:

- "ours": `lora_rlhf.stages.dpo.train_dpo`: one 4-bit base holding the policy and, as a frozen adapter, the
  reference (the SFT adapter).
- "trl": TRL 1.16's DPOTrainer set up the usual QLoRA way with a separate reference model: the policy is the base
  loaded in 4-bit (BitsAndBytesConfig -> prepare_model_for_kbit_training) with the SFT adapter on it, trainable;
  the reference is a second 4-bit model, the SFT adapter merged into the base before quantizing (TRL 1.16 cannot
  take a PeftModel as ref_model: its fused LM head needs the plain model's backbone). TRL casts a QLoRA policy's
  adapter to bf16, which on a CPU is far slower (bench_sft.py); we undo it as our stage does, so the two runs differ
  in the reference only (`--trl-bf16-adapters` keeps TRL's cast).

Seconds/step: the median over the timed steps after `--warmup` untimed ones (the reference forward is inside each
step: `precompute_ref_log_probs` is off in both unless `--precompute`). Peak memory: the process's resident-set
high-water mark (ru_maxrss) on the CPU; torch.cuda.max_memory_allocated on CUDA. Runs alternate ours/trl
`--repeats` times, so drift on a shared machine hits both alike. Target (issue 26): no slower, and at most 0.6 x
the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBEDDED = "smollm2-135m-instruct"
WORDS = ("the river carries light stones down from the hills while birds watch and the wind turns the leaves "
         "over in quiet circles near the old mill").split()


def settings(args: argparse.Namespace) -> dict:
    """DPOConfig arguments both runs share (ours through the recipe's `dpo:` section)."""
    return {"per_device_train_batch_size": args.batch, "learning_rate": 5e-5, "max_length": args.max_length,
            "beta": 0.1, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
            "lr_scheduler_type": "constant", "gradient_checkpointing": args.gradient_checkpointing,
            "precompute_ref_log_probs": args.precompute}


def dtype_name(device: str) -> str:
    return "fp32" if device == "cpu" else "bf16"


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


# ---------------------------------------------------------------------------------------------- preparation
def prepare(work: Path, model: str, device: str, pairs: int, max_length: int) -> None:
    """Once per bench: an SFT adapter (random, fixed), that adapter merged into the base (TRL's reference), and
    `pairs` conversational preference rows whose sequences fit max_length."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.core.models import resolve_model
    from lora_rlhf.core.text import encode
    from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

    cfg = ModelConfig(name=model, device=device, dtype=dtype_name(device))
    sb = SharedBase.load(cfg, QuantizationConfig(mode="none"), for_training=False)
    torch.manual_seed(0)
    sb.add_adapter("policy", LoraSettings(r=16, alpha=32, dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: LoRA B away from zero, so reference != base
        for p in sb.trainable_parameters("policy") or sb._params["policy"]:
            p.copy_(torch.randn_like(p) * 0.01)
    sb.save_adapter("policy", work / "sft", stage="sft")
    tokenizer = sb.tokenizer
    del sb
    base = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32 if device == "cpu"
                                                else torch.bfloat16)
    merged = PeftModel.from_pretrained(base, str(work / "sft")).merge_and_unload()
    merged.save_pretrained(work / "sft-merged")
    tokenizer.save_pretrained(work / "sft-merged")
    rng = random.Random(0)
    rows = []
    for i in range(pairs):
        prompt = [{"role": "user", "content": f"Describe place number {i} in a few words."}]
        answers = []
        for _ in range(2):
            words = [rng.choice(WORDS) for _ in range(max_length)]
            while len(encode(tokenizer, prompt, " ".join(words))) > max_length:
                words = words[: len(words) * 9 // 10]
            answers.append(" ".join(words))
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answers[0]}],
                     "rejected": [{"role": "assistant", "content": answers[1]}]})
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------- the two runs
def run_ours(work: Path, model: str, device: str, args: argparse.Namespace, steps: int) -> list[float]:
    import transformers

    from lora_rlhf.recipe.config import recipe_from_dict
    from lora_rlhf.stages.dpo import train_dpo

    timer = _step_timer()
    recipe = recipe_from_dict({
        "output_dir": str(work / "ours-run"), "seed": 0,
        "model": {"name": model, "device": device, "dtype": dtype_name(device),
                  "gradient_checkpointing": args.gradient_checkpointing},
        "quantization": {"mode": "4bit"}, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"dpo": {"path": str(work / "pairs.jsonl")}},
        "dpo": {**settings(args), "max_steps": steps, "sft_adapter": str(work / "sft")},
    })
    original = transformers.Trainer.__init__

    def with_timer(self, *a, **kw):  # attach the timer without changing the library
        kw["callbacks"] = [*(kw.get("callbacks") or []), timer]
        original(self, *a, **kw)

    transformers.Trainer.__init__ = with_timer
    os.environ["LORA_RLHF_SKIP_PREFLIGHT"] = "1"  # measure, whatever the plan says
    train_dpo(recipe)
    return timer.times


def run_trl(work: Path, model: str, device: str, args: argparse.Namespace, steps: int) -> list[float]:
    import datasets
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    from lora_rlhf.core.models import resolve_model

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    where = {"": "cpu" if device == "cpu" else 0}
    tokenizer = AutoTokenizer.from_pretrained(work / "sft")
    policy = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=dtype, quantization_config=quant,
                                                  device_map=where)
    policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=args.gradient_checkpointing)
    policy = PeftModel.from_pretrained(policy, str(work / "sft"), is_trainable=True)
    reference = AutoModelForCausalLM.from_pretrained(work / "sft-merged", dtype=dtype, quantization_config=quant,
                                                     device_map=where)
    config = DPOConfig(output_dir=str(work / "trl-run"), max_steps=steps, seed=0, use_cpu=device == "cpu",
                       bf16=device == "cuda", **settings(args))
    timer = _step_timer()
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                         train_dataset=datasets.load_dataset("json", data_files=str(work / "pairs.jsonl"),
                                                             split="train"), callbacks=[timer])
    if not args.trl_bf16_adapters:
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    trainer.train()
    return timer.times


def child(kind: str, work: Path, model: str, device: str, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    times = (run_ours if kind == "ours" else run_trl)(work, model, device, args, args.steps + args.warmup)
    result = {"kind": kind, "sec_per_step": statistics.median(times[args.warmup:]), "steps": len(times),
              "wall_seconds": time.perf_counter() - started,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- parent side
def build_tiny(folder: Path) -> Path:
    """The test suite's tiny Llama (tests/helpers.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import build_tiny_model

    return build_tiny_model(folder)


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[2:4])} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED, help="the base: embedded 135M, a Hub id, a folder, or `tiny`")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="alternating ours/trl runs")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (2 x as many sequences)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens of prompt + answer, every pair")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs in both")
    parser.add_argument("--trl-bf16-adapters", action="store_true", help="keep TRL's bf16 cast of the policy")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "WORK", "MODEL", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, work, model, device = args.child
        if kind == "prepare":
            prepare(Path(work), model, device, (args.steps + args.warmup) * args.batch, args.max_length)
        else:
            child(kind, Path(work), model, device, args)
        return
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in (("steps", args.steps), ("warmup", args.warmup),
                                                        ("batch", args.batch), ("max_length", args.max_length))]
    flags += [f"--{k.replace('_', '-')}" for k in ("gradient_checkpointing", "precompute", "trl_bf16_adapters")
              if getattr(args, k)]
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        model = str(build_tiny(work / "tiny-model")) if args.model == "tiny" else args.model
        _run([sys.executable, __file__, "--child", "prepare", str(work), model, args.device, *flags])
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for _ in range(args.repeats):
            for kind in ("ours", "trl"):
                out = _run([sys.executable, __file__, "--child", kind, str(work), model, args.device, *flags])
                runs[kind] += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
                r = runs[kind][-1]
                print(f"[{kind}: {r['sec_per_step']:.3f} s/step, {r['peak_rss_gb']:.2f} GB RSS]", file=sys.stderr,
                      flush=True)
    report(runs, args, args.model)


def report(runs: dict[str, list[dict]], args: argparse.Namespace, model: str) -> None:
    peak = "peak_cuda_gb" if args.device == "cuda" else "peak_rss_gb"
    step = {k: statistics.median(r["sec_per_step"] for r in rs) for k, rs in runs.items()}
    mem = {k: max(r[peak] for r in rs) for k, rs in runs.items()}
    print(f"{model} on {args.device}, 4-bit, LoRA r=16, {args.batch} pairs/step, {args.max_length} tokens, "
          f"{args.steps} timed steps, {args.repeats} run(s) each, precompute_ref_log_probs={args.precompute}")
    print(f"{'':6}{'s/step':>10}{'peak GB':>10}")
    for kind in ("ours", "trl"):
        print(f"{kind:6}{step[kind]:>10.3f}{mem[kind]:>10.2f}")
    speed, memory = step["ours"] / step["trl"], mem["ours"] / mem["trl"]
    print(f"ours / trl: time {speed:.2f} x, memory {memory:.2f} x; target: time <= 1.0 x, memory <= 0.6 x: "
          f"{'met' if speed <= 1.0 and memory <= 0.6 else 'NOT met'}")


if __name__ == "__main__":
    main()
