"""Raw forward and forward+backward time of the base + one LoRA adapter, per quantization: what 4-bit costs.

    python bench/bench_forward_backward.py                       # 135M embedded model, 8 x 128 tokens
    python bench/bench_forward_backward.py --batch-size 16 --length 64

On the CPU bitsandbytes dequantizes each 4-bit weight on every call; this shows how much of a step that is once
the batch is large enough for the matmuls to dominate (the SFT, reward and PPO optimisation phases), apart from
any trainer. Each configuration runs in a fresh subprocess; prints seconds per call (mean of `--repeats`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(args: argparse.Namespace, quant: str, dtype: str) -> dict:
    import torch

    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

    torch.manual_seed(0)
    sb = SharedBase.load(ModelConfig(name=args.model, dtype=dtype), QuantizationConfig(mode=quant))
    sb.add_adapter("policy", LoraSettings(r=16, alpha=32, dropout=0.0))
    sb.keep_adapters_in_fp32()
    model = sb.model.train()
    ids = torch.randint(0, sb.tokenizer.vocab_size, (args.batch_size, args.length), device=sb.device)

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def forward_backward() -> None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    forward_backward()  # warm-up
    result = {"quantization": quant, "dtype": dtype}
    for name, fn in (("forward_s", forward), ("forward_backward_s", forward_backward)):
        started = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        result[name] = (time.perf_counter() - started) / args.repeats
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("QUANT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args, *args.child)), flush=True)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"} if args.model == "smollm2-135m-instruct" else dict(os.environ)
    print(f"{args.model}, LoRA r=16 all-linear, {args.batch_size} x {args.length} tokens, mean of {args.repeats}")
    print(f"{'base':<12}{'forward s':>12}{'fwd+bwd s':>12}")
    for quant, dtype in (("4bit", "fp32"), ("none", "fp32"), ("none", "bf16")):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", quant, dtype],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{quant}/{dtype} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        label = "4-bit NF4" if quant == "4bit" else dtype
        print(f"{label:<12}{r['forward_s']:>12.3f}{r['forward_backward_s']:>12.3f}")


if __name__ == "__main__":
    main()
