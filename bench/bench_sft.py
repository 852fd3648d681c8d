"""SFT speed and memory on the embedded 135M model: 4-bit vs bf16 vs fp32, and our wrapper vs plain TRL.

    python bench/bench_sft.py                 # all configurations, 8 timed steps each
    python bench/bench_sft.py --steps 4 --only 4bit

Each configuration runs in a fresh subprocess so that peak memory (ru_maxrss, the process's RSS high-water
mark; on CUDA torch.cuda.max_memory_allocated as well) belongs to it alone. Seconds/step is the median over
the timed steps after `--warmup` untimed ones. "trl" runs `trl.SFTTrainer` directly on a model prepared the
usual QLoRA way (BitsAndBytesConfig -> prepare_model_for_kbit_training -> get_peft_model) with identical
SFTConfig arguments; "ours" runs `lora_rlhf.stages.sft.train_sft` from a recipe. Runs alternate ours/trl `--repeats`
times and the overhead is the ratio of the medians, so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [{"prompt": f"Write one sentence about the number {i}.",
         "completion": f"The number {i} comes right after {i - 1} and right before {i + 1}."} for i in range(64)]
SETTINGS = {"per_device_train_batch_size": 4, "learning_rate": 2e-4, "max_length": 128, "logging_steps": 1,
            "save_strategy": "no", "report_to": "none", "lr_scheduler_type": "constant", "seed": 0}


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


def run_ours(precision: str, steps: int, data: Path, out: Path) -> list[float]:
    from lora_rlhf.recipe.config import recipe_from_dict
    from lora_rlhf.stages.sft import train_sft

    timer = _step_timer()
    recipe = recipe_from_dict({
        "output_dir": str(out), "seed": 0,
        "model": {"dtype": "bf16" if precision == "bf16" else "fp32"},
        "quantization": {"mode": "4bit" if precision == "4bit" else "none"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"sft": {"path": str(data)}},
        "sft": {**{k: v for k, v in SETTINGS.items() if k != "seed"}, "max_steps": steps},
    })
    import transformers

    original = transformers.Trainer.__init__

    def with_timer(self, *a, **kw):  # attach the timer without changing the library
        kw["callbacks"] = [*(kw.get("callbacks") or []), timer]
        original(self, *a, **kw)

    transformers.Trainer.__init__ = with_timer
    train_sft(recipe)
    return timer.times


def run_trl(precision: str, steps: int, data: Path, out: Path) -> list[float]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from lora_rlhf.core.models import prepare_embedded

    path = prepare_embedded("smollm2-135m-instruct")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype) if precision == "4bit" else None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant,
                                                 device_map={"": "cpu"})
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    timer = _step_timer()
    # Our recipe default: no gradient checkpointing (TRL's SFTConfig defaults to it); identical settings in both.
    args = SFTConfig(output_dir=str(out), max_steps=steps, use_cpu=True, bf16=False, gradient_checkpointing=False,
                     **SETTINGS)
    SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(data), split="train"),
               processing_class=tokenizer, callbacks=[timer]).train()
    return timer.times


def child(kind: str, precision: str, steps: int, warmup: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demos.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        fn = run_ours if kind == "ours" else run_trl
        times = fn(precision, steps + warmup, data, Path(tmp) / "out")
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": kind, "precision": precision, "sec_per_step": statistics.median(times[warmup:]),
                      "peak_rss_mb": peak_rss_mb}))


def measure(kind: str, precision: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, precision, "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"{kind}/{precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating ours/trl runs per precision")
    parser.add_argument("--only", choices=["4bit", "bf16", "fp32"], action="append")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.steps, args.warmup)
        return
    print(f"SmolLM2-135M, LoRA r=16 all-linear, batch 4, max_length 128, {args.steps} timed steps, "
          f"{os.cpu_count()} CPU threads")
    print(f"{'precision':<10}{'ours s/step':>12}{'trl s/step':>12}{'overhead':>10}{'ours peak RSS':>15}"
          f"{'trl peak RSS':>14}")
    for precision in args.only or ["4bit", "bf16", "fp32"]:
        ours, trl = [], []
        for _ in range(args.repeats):
            ours.append(measure("ours", precision, args.steps, args.warmup))
            trl.append(measure("trl", precision, args.steps, args.warmup))
        o = statistics.median(r["sec_per_step"] for r in ours)
        t = statistics.median(r["sec_per_step"] for r in trl)
        mo = max(r["peak_rss_mb"] for r in ours)
        mt = max(r["peak_rss_mb"] for r in trl)
        print(f"{precision:<10}{o:>12.3f}{t:>12.3f}{(o / t - 1) * 100:>+9.1f}%{mo:>12.0f} MB{mt:>11.0f} MB")


if __name__ == "__main__":
    main()
