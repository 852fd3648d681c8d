"""The contract every stage keeps, so that the pipeline and the commands run any of them the same way.

A stage module has `run(recipe, *, resume) -> StageResult` and `is_complete(recipe) -> bool` (complete: its output
is finished, by the same test later stages use to find it), and is registered once by name in stages/registry.py.

resume: True continues from the stage's newest checkpoint (`--resume`); False starts afresh (a finished run is
replaced only once the new one has finished); None, the pipeline's, leaves it to the stage: PPO continues where it
finds a checkpoint, the Trainer stages start afresh. Stages without checkpoints (data, compare, eval) ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    """What a stage's `run` returns."""

    name: str
    output: Path | None
    """The stage's folder (OUT/<stage>); None: the data stage without a builder, or a stage skipped as complete."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The stage's final numbers, as its metrics.json / results.json holds them. Under a launcher they are rank 0's:
    another rank may hold only its own part, or none (the reward stage's checks run on rank 0 alone)."""
    skipped: bool = False
    """Complete already, so not run (the pipeline)."""
    seconds: float = 0.0
