"""Peak memory and speed of PPO: one shared 4-bit base vs. four separately loaded fp32 models.

    python bench/bench_ppo_memory.py                      # 135M embedded model, a few small PPO steps
    python bench/bench_ppo_memory.py --batch-size 8 --response-length 32 --steps 3

Both configurations run the same PPO code (lora_rlhf.stages.ppo) on the same prompts, lengths and settings, with the
same LoRA adapters for every role (an SFT adapter as policy/reference, a reward adapter + head as reward/value):

    shared     one base in 4-bit NF4, the four roles as adapters on it (what `lora-rlhf ppo` does)
    shared-fp32  the same sharing with the base in fp32: separates what sharing saves from what 4-bit saves
    separate   four fp32 copies of the base, one role each: the memory layout TRL's PPO required (separate
               policy, reference, reward and value models). On the CPU transformers memory-maps the checkpoint,
               so four loads of one file would share pages, which four different checkpoints (or four GPU
               copies) never do: each copy's weights are therefore given their own memory.

Each configuration runs in a fresh subprocess. Memory: on CUDA torch.cuda.max_memory_allocated; on the CPU the
resident-set high-water mark (ru_maxrss), over the whole run and, separately, over the PPO steps alone (the
mark is reset after loading via /proc/self/clear_refs). Speed: episodes per second over the timed steps (one
untimed warm-up step first). Prints a table; this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("shared", "separate", "shared-fp32")
PROMPTS = ["Write a haiku about rain.", "Explain photosynthesis to a child.", "Give me three tips for sleeping well.",
           "What is the capital of France?", "Summarise the plot of Hamlet in two sentences.",
           "How do I boil an egg?", "Name a prime number larger than 100.", "Why is the sky blue?"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def make_recipe(args: argparse.Namespace, work: Path, quantization: str):
    from lora_rlhf.recipe.config import recipe_from_dict

    return recipe_from_dict({
        "output_dir": str(work / f"run-{quantization}"), "seed": 0,
        "model": {"name": args.model, "device": args.device, "dtype": "fp32" if quantization == "none" else "auto"},
        "quantization": {"mode": quantization}, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "ppo": {"sft_adapter": str(work / "sft"), "reward_adapter": str(work / "reward"),
                "total_episodes": args.batch_size * (args.steps + 1), "batch_size": args.batch_size,
                "local_rollout_forward_batch_size": args.batch_size, "response_length": args.response_length,
                "num_ppo_epochs": args.ppo_epochs, "num_mini_batches": 1, "learning_rate": 1e-5,
                "stop_token": None},  # fixed lengths: both configurations do exactly the same work
    })


def prepare(args: argparse.Namespace, work: Path) -> None:
    """Random (but fixed) SFT and reward adapters, written once for both configurations."""
    import torch

    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

    sb = SharedBase.load(ModelConfig(name=args.model, device=args.device), QuantizationConfig(mode="4bit"))
    lora = LoraSettings(r=16, alpha=32, dropout=0.0)
    torch.manual_seed(0)
    sb.add_adapter("policy", lora)
    sb.add_adapter("reward", lora)
    sb.add_head("reward")
    with torch.no_grad():
        for name, p in sb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    sb.save_adapter("policy", work / "sft", stage="sft")
    sb.save_adapter("reward", work / "reward", stage="reward", reward_offset=0.0)


def own_memory(model) -> None:
    """Copy every tensor that is still a view into the memory-mapped checkpoint (see the module docstring)."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            for _, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                t.data = t.data.clone()


class SeparateBases:
    """Four SharedBase objects, one role each, behind the one-base interface the PPO code uses: the memory
    layout TRL's PPO required, for comparison only. `use(role)` runs that role's own base."""

    def __init__(self, bases: dict) -> None:
        import torch

        self.bases, self.active = bases, bases["policy"]
        self.tokenizer, self.info = self.active.tokenizer, self.active.info
        self.heads = {role: sb.heads[role] for role, sb in bases.items() if role in sb.heads}
        for sb in bases.values():  # PPO compares two forwards of one policy: no dropout (as roles.disable_dropout)
            for module in sb.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0

    @property
    def device(self):
        return self.active.device

    def use(self, role: str):
        import contextlib

        @contextlib.contextmanager
        def run():
            self.active = self.bases[role]
            with self.active.use(role) as model:
                yield model
        return run()

    def backbone(self):
        return self.active.backbone()

    def has(self, role: str) -> bool:
        return role in self.bases and self.bases[role].has(role)

    def trainable_parameters(self, role: str) -> list:
        return self.bases[role].trainable_parameters(role)

    def train(self, on: bool = True) -> None:
        for sb in self.bases.values():
            sb.train(on)


def child(args: argparse.Namespace, work: Path, mode: str) -> dict:
    import bitsandbytes  # noqa: F401 - library memory counts in the after-imports baseline, not in loading
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.stages.ppo.roles import resolve_sources
    from lora_rlhf.stages.ppo.rollout import RewardSource
    from lora_rlhf.stages.ppo.trainer import PPOTrainer, build_trainer

    torch.set_num_threads(args.threads)
    after_imports = rss_mb()
    recipe = make_recipe(args, work, "4bit" if mode == "shared" else "none")
    sources = resolve_sources(recipe)
    prompts = (PROMPTS * args.batch_size)[: args.batch_size]
    if mode in ("shared", "shared-fp32"):
        trainer = build_trainer(recipe, sources, prompts)
    else:
        torch.manual_seed(recipe.seed)
        bases = {}
        for role in ("policy", "reference", "reward", "value"):  # four separate fp32 bases, one role each
            bases[role] = SharedBase.load(recipe.model, recipe.quantization)
            own_memory(bases[role].model)
        bases["reference"].load_adapter("reference", sources.sft, trainable=False)
        bases["policy"].load_adapter("policy", sources.sft, trainable=True)
        meta = bases["reward"].load_adapter("reward", sources.reward_adapter, trainable=False)
        bases["value"].load_adapter("value", sources.reward_adapter, trainable=True)
        reward = RewardSource(description=str(sources.reward_adapter), offset=float(meta.get("reward_offset") or 0))
        trainer = PPOTrainer(recipe, SeparateBases(bases), prompts, reward)
    device = trainer.sb.device
    loaded = rss_mb()
    trainer.step()  # warm-up (kernels, allocator, caches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        total_peak_gpu = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    hwm_before_steps = hwm_mb()
    reset = reset_hwm()
    started = time.perf_counter()
    splits = {"time/generation": 0.0, "time/scoring": 0.0, "time/optimisation": 0.0}
    for _ in range(args.steps):
        metrics, _ = trainer.step()
        for k in splits:
            splits[k] += metrics[k]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    result = {"mode": mode, "device": str(device), "episodes_per_s": args.steps * args.batch_size / elapsed,
              "seconds_per_step": elapsed / args.steps, **{k: v / args.steps for k, v in splits.items()},
              "rss_after_imports_mb": after_imports, "rss_after_load_mb": loaded,
              "peak_rss_mb": max(hwm_before_steps, hwm_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "peak_rss_steps_mb": hwm_mb() if reset else None}
    if device.type == "cuda":
        result["peak_gpu_mb"] = max(total_peak_gpu, torch.cuda.max_memory_allocated() / 2**20)
        result["peak_gpu_steps_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=16)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed PPO steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="CPU: set glibc's MALLOC_MMAP_THRESHOLD_ in every configuration (e.g. 131072), so freed "
                             "activations go back to the OS instead of staying in the heap (slower; same for all)")
    parser.add_argument("--child", choices=["prepare", *MODES], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        work = Path(args.work)
        if args.child == "prepare":
            prepare(args, work)
        else:
            print("RESULT " + json.dumps(child(args, work, args.child)), flush=True)
        return

    passthrough = [a for a in sys.argv[1:]]
    env = dict(os.environ)
    if args.model == "smollm2-135m-instruct":
        env.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model needs no network; never wait on one
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        for mode in ("prepare", *MODES):
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", mode, "--work", tmp],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            for line in proc.stdout.splitlines():
                if line.startswith("RESULT "):
                    results[mode] = json.loads(line[len("RESULT "):])
            print(f"[{mode} done in {time.perf_counter() - started:.0f} s]", file=sys.stderr)
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    shared, separate = results["shared"], results["separate"]
    gpu = "peak_gpu_mb" in shared
    print(f"\nPPO on {args.model}: batch {args.batch_size}, response {args.response_length} tokens, "
          f"{args.ppo_epochs} PPO epoch(s), {args.steps} timed steps, device {shared['device']}, "
          f"{args.threads} threads" + (f", MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
                                       if args.malloc_mmap_threshold else ""))
    rows = [("peak GPU memory, whole run (MB)", "peak_gpu_mb"), ("peak GPU memory, PPO steps (MB)", "peak_gpu_steps_mb")] \
        if gpu else []
    rows += [("peak RSS, whole run (MB)", "peak_rss_mb"), ("peak RSS, PPO steps (MB)", "peak_rss_steps_mb"),
             ("RSS after imports (MB)", "rss_after_imports_mb"), ("RSS after loading (MB)", "rss_after_load_mb"),
             ("episodes / s", "episodes_per_s"), ("s / step", "seconds_per_step"),
             ("  generation s / step", "time/generation"), ("  scoring s / step", "time/scoring"),
             ("  optimisation s / step", "time/optimisation")]
    names = [m for m in MODES if m in results]
    print(f"{'':34}" + "".join(f"{LABELS[m]:>14}" for m in names) + "   ratios to 4 x fp32")
    for label, key in rows:
        values = [results[m].get(key) for m in names]
        if any(v is None for v in values):
            continue
        ratios = "  ".join(f"{v / values[1]:5.2f}" for v, m in zip(values, names, strict=True) if m != "separate")
        print(f"{label:34}" + "".join(f"{v:14.2f}" for v in values) + f"   {ratios}")
    if not gpu:  # what the models and training add on top of the interpreter and libraries (equal for all)
        above = [results[m]["peak_rss_mb"] - results[m]["rss_after_imports_mb"] for m in names]
        ratios = "  ".join(f"{v / above[1]:5.2f}" for v, m in zip(above, names, strict=True) if m != "separate")
        print(f"{'peak RSS above imports (MB)':34}" + "".join(f"{v:14.2f}" for v in above) + f"   {ratios}")
    memory_key = "peak_gpu_mb" if gpu else "peak_rss_mb"
    print(f"\nshared 4-bit vs 4 x fp32: memory {shared[memory_key] / separate[memory_key]:.2f}x (target <= 0.35x), "
          f"speed {shared['episodes_per_s'] / separate['episodes_per_s']:.2f}x episodes/s (target >= 1.0x)")


LABELS = {"shared": "shared 4-bit", "separate": "4 x fp32", "shared-fp32": "shared fp32"}


if __name__ == "__main__":
    main()
