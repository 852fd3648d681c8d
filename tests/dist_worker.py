"""Run by tests/test_distributed.py, once as a plain process and once per rank under torchrun.

    python tests/dist_worker.py ppo-optimise RECIPE.json OUT.pt
    python tests/dist_worker.py gather-rows OUT.pt
    python tests/dist_worker.py hung-rank RECIPE.json

builds the PPO trainer of RECIPE, takes one fixed global batch (rank 0's, broadcast) with fixed advantages,
runs step 5 (optimise) on it, and rank 0 saves the trainable tensors and the world size to OUT.pt. The test runs
`ppo_optimise` in its own process too, as the one-process reference.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from lora_rlhf.core import distributed
from lora_rlhf.errors import LoraRlhfError
from lora_rlhf.recipe.config import recipe_from_dict

PROMPTS = ["Say something.", "Tell me a story about a cat.", "Hi!", "2+2?", "Name a colour.", "Why?",
           "Count to three.", "Write a haiku."]


def ppo_optimise(recipe_file: str, out: str) -> None:
    # imported here: the other workers need none of PPO (its imports take seconds in each rank)
    from lora_rlhf.stages.ppo import rollout
    from lora_rlhf.stages.ppo.roles import resolve_sources
    from lora_rlhf.stages.ppo.trainer import build_trainer

    recipe = recipe_from_dict(json.loads(open(recipe_file).read()))
    trainer = build_trainer(recipe, resolve_sources(recipe), PROMPTS)
    sb, cfg = trainer.sb, trainer.cfg
    batch = None
    if distributed.is_main():
        torch.manual_seed(1)
        batch = rollout.score(sb, rollout.generate(sb, PROMPTS, cfg), trainer.reward, cfg)
    # pickled tensors come back on the device they left: through the CPU, then onto this rank's own
    batch = distributed.broadcast_object(batch.to(torch.device("cpu")) if batch is not None else None).to(sb.device)
    generator = torch.Generator().manual_seed(2)
    mask = batch.response_mask
    advantages = torch.randn(mask.shape, generator=generator).to(mask.device) * mask
    returns = torch.randn(mask.shape, generator=generator).to(mask.device) * mask
    initial = {f"param.{i}": p.detach().clone() for i, p in enumerate(trainer.params)}
    sb.train(True)
    stats = trainer._optimise(batch, advantages, returns)
    if distributed.is_main():
        tensors = {f"param.{i}": p.detach().clone() for i, p in enumerate(trainer.params)}
        torch.save({"world_size": distributed.world_size(), "tensors": tensors, "initial": initial,
                    "stats": stats}, out)


def gather_rows(out: str) -> None:
    """Rank r holds r + 2 rows of value r (a reward batch of whole prompts differs in size between ranks) and a
    scalar; rank 0 saves what distributed.gather_rows returns for both, and whether distributed.finish tore the
    process group down (as every launched command does before it exits)."""
    distributed.state()  # the process group, as a trainer would have made it
    rows = torch.full((distributed.rank() + 2, 1), float(distributed.rank()))
    gathered = distributed.gather_rows(rows), distributed.gather_rows(torch.tensor(distributed.rank() + 10.0))
    distributed.finish()
    if distributed.is_main():
        torch.save({"rows": gathered[0], "scalars": gathered[1],
                    "torn_down": not torch.distributed.is_initialized()}, out)


def hung_rank(recipe_file: str) -> None:
    """Rank 1 hangs before a barrier (as a SIGSTOPped rank would; a sleeping one dies on torchrun's SIGTERM at once,
    which keeps the test short); rank 0 must stop after RECIPE's distributed.timeout_minutes, naming rank 1. Rank 0
    also prints the process group's own timeout, which must be the recipe's too."""
    distributed.configure(recipe_from_dict(json.loads(open(recipe_file).read())))
    if distributed.rank() == 1:
        time.sleep(600)
    from torch.distributed.distributed_c10d import _get_default_group

    timeout = _get_default_group()._get_backend(distributed.device()).options._timeout  # gloo or NCCL
    print(f"process group timeout {timeout.total_seconds():g} s", file=sys.stderr, flush=True)
    try:
        distributed.barrier("the test's barrier")
    except LoraRlhfError as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    {"ppo-optimise": ppo_optimise, "gather-rows": gather_rows, "hung-rank": hung_rank}[sys.argv[1]](*sys.argv[2:])
    distributed.finish()
