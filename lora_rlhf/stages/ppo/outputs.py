"""What a PPO run shows and leaves behind besides adapters: metrics.jsonl, samples.jsonl, train.log, run.json,
a progress bar, and the optional trackers.

    OUT/ppo/metrics.jsonl   one JSON line per PPO step (every metric)
    OUT/ppo/samples.jsonl   {"step", "prompt", "response", "score"} every sample_every steps
    OUT/ppo/train.log       the log lines, including the sample tables
    OUT/ppo/run.json        versions, device, where each role came from, start / resume times
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

from lora_rlhf import __version__
from lora_rlhf.core.io import clean_json, read_jsonl, write_json_atomic, writing
from lora_rlhf.stages.ppo.tracking import Trackers

log = logging.getLogger("lora_rlhf.stages.ppo")

# Shown in the per-step log line, in this order.
HEADLINE = (("objective/scores", "score"), ("objective/gold", "gold"), ("objective/kl", "kl"),
            ("objective/entropy", "entropy"), ("loss/policy", "pg"), ("loss/value", "vf"), ("policy/clipfrac", "clip"), ("kl_coef", "beta"),
            ("tokens/s", "tok/s"))
SAMPLES_SHOWN = 4


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (a resumed run re-does those steps), and a last line a kill cut short."""
    if not path.is_file():
        return
    keep = [row for _, row in read_jsonl(path, "PPO log", cut_short_tail=True) if row["step"] <= last_step]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in keep), encoding="utf-8")


def prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", "")) if prompt else ""


class RunLog:
    """Files, console and trackers of one PPO run (a resumed run appends)."""

    def __init__(self, out: Path, cfg: Any, config: dict[str, Any], start_step: int, num_steps: int,
                 progress: bool = True):
        self.out, self.cfg = out, cfg
        truncate_jsonl(out / "metrics.jsonl", start_step)
        truncate_jsonl(out / "samples.jsonl", start_step)
        self._handlers = [logging.FileHandler(out / "train.log", encoding="utf-8")]
        self._handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._handlers.append(_TqdmHandler())
        for h in self._handlers:
            log.addHandler(h)
        log.setLevel(logging.INFO)
        try:
            self.trackers = Trackers(cfg.report_to, out, config, run_name=out.parent.name)
        except BaseException:
            self._detach_handlers()  # the logger is module-wide: a failed start must not leave our file on it
            raise
        from tqdm.auto import tqdm

        self.bar = tqdm(total=num_steps, initial=start_step, desc="PPO", unit="step", dynamic_ncols=True,
                        disable=None if progress else True, file=sys.stderr)

    def step(self, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        with writing(self.out / "metrics.jsonl"), open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(clean_json(metrics)) + "\n")
        self.trackers.log(metrics, step)
        self.bar.update(1)
        gold = {"gold": f"{metrics['objective/gold']:.3f}"} if "objective/gold" in metrics else {}
        self.bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", **gold, kl=f"{metrics['objective/kl']:.3f}")
        if step % self.cfg.logging_steps == 0 or step == 1:
            parts = [f"{short} {metrics[key]:.4g}" for key, short in HEADLINE if key in metrics]
            log.info("step %d/%d | %s", step, self.bar.total, " | ".join(parts))

    def samples(self, step: int, prompts: list[Any], texts: list[str], scores: list[float]) -> None:
        rows = [{"step": step, "prompt": prompt_text(p), "response": r, "score": s}
                for p, r, s in list(zip(prompts, texts, scores, strict=True))[:SAMPLES_SHOWN]]
        with writing(self.out / "samples.jsonl"), open(self.out / "samples.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(clean_json(r), ensure_ascii=False) + "\n" for r in rows)
        lines = [f"samples at step {step}:", f"  {'score':>8} | {'prompt':<40} | response"]
        lines += [f"  {r['score']:>8.3f} | {_clip(r['prompt'], 40):<40} | {_clip(r['response'], 80)}" for r in rows]
        log.info("\n".join(lines))

    def close(self) -> None:
        self.bar.close()
        try:
            self.trackers.close()
        finally:
            self._detach_handlers()

    def _detach_handlers(self) -> None:
        for h in self._handlers:
            log.removeHandler(h)
            h.close()


class QuietRunLog:
    """A data-parallel rank other than 0: the same calls as RunLog, nothing written or shown."""

    def step(self, metrics: dict[str, float]) -> None:
        pass

    def samples(self, step: int, prompts: list[Any], texts: list[str], scores: list[float]) -> None:
        pass

    def close(self) -> None:
        pass


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class _TqdmHandler(logging.Handler):
    """Log lines to stderr without breaking the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def write_run_info(out: Path, info: dict[str, Any], resumed_from: int | None) -> None:
    """run.json: created at the start, with one entry per (re)start."""
    import peft
    import torch
    import transformers
    import trl

    path = out / "run.json"
    run = json.loads(path.read_text()) if path.is_file() else {"starts": []}
    run.update(info)
    run["versions"] = {"lora_rlhf": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__, "trl": trl.__version__, "python": platform.python_version()}
    run["starts"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from_step": resumed_from,
                          "argv": sys.argv})
    write_json_atomic(path, run)
