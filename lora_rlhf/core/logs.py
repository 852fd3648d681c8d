"""A stage's log file and metrics: `train.log` (human-readable) and `metrics.json` (final numbers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_rlhf.core.io import write_json_atomic

LOG_FILE = "train.log"
METRICS_FILE = "metrics.json"
_OURS = "_lora_rlhf_stage_log"  # marks the handlers stage_logger attached


def stage_logger(folder: Path, stage: str) -> logging.Logger:
    """A logger writing to `folder/train.log` (appending, so a resumed run keeps its history).

    Our file handler is attached whatever other handlers the logger has: a test harness or a program embedding
    the library may have added its own, and a resumed run must still reach the file. `close_logger` closes it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"lora_rlhf.{stage}.{folder.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    path = str((folder / LOG_FILE).resolve())
    if not any(getattr(h, _OURS, False) and h.baseFilename == path for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        setattr(handler, _OURS, True)
        logger.addHandler(handler)
    return logger


def close_logger(logger: logging.Logger) -> None:
    """Flush and close the file handlers `stage_logger` attached; other handlers are not ours to remove."""
    for handler in list(logger.handlers):
        if getattr(handler, _OURS, False):
            handler.close()
            logger.removeHandler(handler)


def write_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    write_json_atomic(folder / METRICS_FILE, metrics, sort_keys=True)


class LogCallback(TrainerCallback):
    """Copies every Trainer log record (loss, lr, grad norm...) into train.log as one JSON line."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.history: list[dict[str, Any]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401 - transformers hook
        if logs:
            record = {"step": state.global_step, **logs}
            self.history.append(record)
            self.logger.info(json.dumps(record))

    def final_eval(self, trainer: Any) -> dict[str, Any]:
        """Held-out metrics of the final model: those of an eval logged at the last step, else a fresh evaluate().

        With `eval_strategy: epoch` the trainer has just evaluated the final weights; doing it again costs a
        whole pass over the held-out set (25 s of the demo's reward stage) for identical numbers.
        """
        evals = [r for r in self.history if "eval_loss" in r]
        best_reloaded = getattr(getattr(trainer, "args", None), "load_best_model_at_end", False)
        if evals and evals[-1]["step"] == trainer.state.global_step and not best_reloaded:
            return {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
        return trainer.evaluate()
