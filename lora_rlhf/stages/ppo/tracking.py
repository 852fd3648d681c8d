"""Optional experiment trackers (`ppo.report_to`): tensorboard, trackio, wandb.

metrics.jsonl is always written; a tracker only mirrors it. Each tracker's package is imported lazily, and a
missing one is reported before training starts, not after the first step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lora_rlhf.errors import RecipeError
from lora_rlhf.recipe.ppo import TRACKERS


def check_trackers(names: list[str]) -> None:
    problems = []
    for name in names:
        if name not in TRACKERS:
            problems.append(f"ppo.report_to: unknown tracker '{name}'; choose from {', '.join(TRACKERS)}")
        elif importlib.util.find_spec(TRACKERS[name]) is None:
            problems.append(f"ppo.report_to: '{name}' needs the package '{TRACKERS[name]}', which is not installed "
                            f"(fix: pip install {TRACKERS[name]}, or remove it from report_to)")
    if problems:
        raise RecipeError(problems)


class Trackers:
    """Fan metrics out to the chosen trackers. `log` takes the same dict that goes to metrics.jsonl."""

    def __init__(self, names: list[str], log_dir: Path, config: dict[str, Any], run_name: str):
        self._writers: list[Any] = []
        self._closers: list[Any] = []
        for name in names:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
                self._writers.append(lambda m, s, w=writer: [w.add_scalar(k, v, s) for k, v in m.items()])
                self._closers.append(writer.close)
            elif name == "trackio":
                import trackio

                trackio.init(project="lora-rlhf", name=run_name, config=config)
                self._writers.append(lambda m, s: trackio.log(m, step=s))
                self._closers.append(trackio.finish)
            elif name == "wandb":
                import wandb

                run = wandb.init(project="lora-rlhf", name=run_name, config=config, dir=str(log_dir))
                self._writers.append(lambda m, s, r=run: r.log(m, step=s))
                self._closers.append(run.finish)

    def log(self, metrics: dict[str, float], step: int) -> None:
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for write in self._writers:
            write(numeric, step)

    def close(self) -> None:
        for close in self._closers:
            close()
