"""core.distributed's collectives as NCCL on GPUs needs them, checked in one CPU process (no launcher).

NCCL serves tensors on the rank's own GPU only; gloo, which every multi-rank CPU test uses, takes tensors on any
device, so it cannot catch a CPU tensor handed to a collective. Here a fake accelerate state puts the rank on the
`meta` device (a device that is not the CPU, as a GPU is not) and fake collectives record where each tensor they
are handed lives, as NCCL would check. The ranks' meeting before each collective (`_arrive`) runs on a real
in-process key-value store.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from lora_rlhf.core import distributed, loading
from lora_rlhf.errors import LoraRlhfError
from lora_rlhf.recipe.config import recipe_from_dict


class Handed(Exception):
    """Raised by a fake collective once it has seen its tensors (meta tensors hold no values to go on with)."""


@pytest.fixture
def two_ranks(monkeypatch):
    """A world of 2 as torchrun would start it, this process being rank 0 (or what the test sets)."""
    fake = SimpleNamespace(device=torch.device("meta"), num_processes=2, process_index=0, local_process_index=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "state", lambda: fake)
    return fake


@pytest.fixture
def fake_nccl(two_ranks, monkeypatch):
    """Every tensor handed to all_reduce / all_gather / broadcast, recorded by device; the call then stops."""
    seen: list[torch.device] = []

    def collective(*args, **kwargs):
        tensors = [a for arg in args for a in (arg if isinstance(arg, list) else [arg]) if isinstance(a, torch.Tensor)]
        seen.extend(t.device for t in tensors)
        raise Handed

    for name in ("all_reduce", "all_gather", "broadcast"):
        monkeypatch.setattr(torch.distributed, name, collective)
    monkeypatch.setattr(distributed, "_arrive", lambda what: None, raising=False)  # meeting first: tested below
    return seen


@pytest.mark.parametrize("call", [
    lambda: distributed.max_over_ranks(1.5),                                   # PPO's peak memory, Ctrl-C flag
    lambda: distributed.all_reduce_sum_([torch.zeros(3, device="meta"), torch.zeros(2, 2, device="meta")]),
    lambda: distributed.broadcast_([torch.zeros(3, device="meta")]),
    lambda: distributed.gather_rows(torch.zeros(2, 1, device="meta")),
    lambda: distributed.gather_rows(torch.zeros(2, 1)),                       # a CPU tensor from a caller
], ids=["max_over_ranks", "all_reduce_sum_", "broadcast_", "gather_rows", "gather_rows-from-cpu"])
def test_every_collective_hands_the_backend_tensors_on_the_ranks_device(fake_nccl, call):
    with pytest.raises(Handed):
        call()
    assert fake_nccl and all(d == torch.device("meta") for d in fake_nccl), fake_nccl


def test_no_module_but_core_distributed_calls_torch_distributed():
    """The audit above covers every collective only while they all live in core.distributed."""
    from pathlib import Path

    root = Path(distributed.__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "distributed.py" and "torch.distributed" in p.read_text()]
    assert offenders == []


def test_a_rank_takes_the_gpu_accelerate_chose_for_it(two_ranks):
    """One visible GPU per rank (SLURM --gpus-per-task=1): accelerate gives rank 1 its cuda:0 (LOCAL_RANK % 1)."""
    two_ranks.device, two_ranks.local_process_index = torch.device("cuda", 0), 1
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 0)
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")
    assert distributed.device() == torch.device("cuda", 0)


def test_model_device_cuda_on_a_cpu_launch_is_refused(two_ranks, monkeypatch):
    two_ranks.device = torch.device("cpu")
    with pytest.raises(LoraRlhfError, match="ACCELERATE_USE_CPU"):
        distributed.local_device(torch.device("cuda"))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto on a GPU machine launched for the CPU
    assert loading.resolve_device(recipe_from_dict({}).model) == torch.device("cpu")


def test_a_rank_that_never_arrives_is_named_after_the_recipes_timeout(two_ranks, monkeypatch):
    store = torch.distributed.HashStore()
    monkeypatch.setattr(distributed, "_store", lambda: store)
    monkeypatch.setattr(distributed, "_settings", dict(distributed._settings))
    monkeypatch.setattr(distributed, "_arrivals", [0])
    distributed.configure(recipe_from_dict({"distributed": {"timeout_minutes": 0.01}}))  # 0.6 s
    assert distributed._settings["timeout"].total_seconds() == pytest.approx(0.6)

    started = time.monotonic()
    with pytest.raises(LoraRlhfError, match=r"(?s)rank 0 waited 0.01 min at the end of X \(collective #1 .*\) for rank 1, "
                                            r"which never reached it.*distributed.timeout_minutes"):
        distributed.barrier("the end of X")
    assert time.monotonic() - started < 10

    # rank 1 is there first for the next collective: rank 0 goes on, and drops its key of the one before
    store.set("lora_rlhf/arrived/2/1", "barrier")
    store.set("lora_rlhf/arrived/1/1", "barrier")
    distributed.barrier()
    assert not store.check(["lora_rlhf/arrived/1/0"]) and store.check(["lora_rlhf/arrived/2/0"])


def test_the_timeout_is_a_positive_number_and_the_trainers_own_is_refused():
    from lora_rlhf.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"distributed": {"timeout_minutes": 0}, "sft": {"ddp_timeout": 60}})
    assert "distributed.timeout_minutes must be > 0, got 0" in str(e.value)
    assert "sft.ddp_timeout: set distributed.timeout_minutes instead" in str(e.value)
