"""Data parallelism: which process this is, and the few collectives the stages need.

Processes are started by the engines users already run, `torchrun` or `accelerate launch`, never by us: both
set RANK / WORLD_SIZE / LOCAL_RANK. accelerate's `PartialState` reads them, initialises torch.distributed
(NCCL on GPUs, gloo on the CPU) and is the same object TRL's trainers use, so our stages and theirs agree on
the process group. A plain `lora-rlhf ...` is a world of one: every function here is then a no-op that
returns its input, and no process group is created.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lora_rlhf.errors import LoraRlhfError


def launched() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state() -> Any:
    """accelerate's process state (a singleton), initialised on first use.

    On a machine without CUDA, or with ACCELERATE_USE_CPU=1, the ranks talk over gloo on the CPU: PartialState
    only picks that when told (`cpu=True`), otherwise it would silently make every rank a world of one.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def world_size() -> int:
    return state().num_processes if launched() else 1


def rank() -> int:
    return state().process_index if launched() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU: `cuda` becomes `cuda:LOCAL_RANK` (every rank on GPU 0 is the classic launch bug)."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", state().local_process_index)
    return device


def barrier() -> None:
    if launched():
        state().wait_for_everyone()


def finish() -> None:
    """Tear the process group down once every rank is done. Left to the interpreter's exit, gloo's threads are
    destroyed while still joinable and a rank aborts ("terminate called without an active exception", SIGABRT:
    1 launch in ~30 here), failing a run whose work had all been written. Call it on success only: a rank that
    failed must not wait in a barrier for the others."""
    if launched() and torch.distributed.is_initialized():
        state().wait_for_everyone()
        state().destroy_process_group()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (pickled: keep it small, tensors on the CPU)."""
    if not launched():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, [n_r, ...] -> [sum of n_r, ...] in rank order, where ranks hold different numbers of rows
    (a plain all_gather needs equal shapes: gloo aborts the process on a mismatch, NCCL may hang). A scalar counts
    as one row, as in accelerate's gather. No gradient."""
    if not launched():
        return tensor
    tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    torch.distributed.all_gather(counts, count)
    padded = tensor.new_zeros((int(max(counts).item()), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(n.item())] for part, n in zip(parts, counts, strict=True)])


def shard(n: int) -> range:
    """This rank's contiguous share of n items (shares differ in size by at most one)."""
    world, r = world_size(), rank()
    return range(r * n // world, (r + 1) * n // world)


def gather_shards(items: list[Any]) -> list[Any]:
    """Every rank's `shard` results concatenated in rank order: the order of one process over all n items."""
    return [x for part in gather_objects(items) for x in part]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not launched():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` over ranks, in place, in one collective (they are flattened into one buffer)."""
    if not launched() or not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(reduced)


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Overwrite `tensors` on every rank with rank 0's, in place."""
    if not launched():
        return
    with torch.no_grad():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each named number averaged over the ranks that have it (logged statistics)."""
    if not launched():
        return values
    every = gather_objects(values)
    keys = sorted({k for v in every for k in v})
    return {k: sum(v[k] for v in every if k in v) / sum(k in v for v in every) for k in keys}


def max_over_ranks(value: float) -> float:
    if not launched():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def describe() -> str:
    """'world size N' plus this rank, for first log lines and run.json."""
    return f"world size {world_size()}" + (f" (rank {rank()})" if launched() else "")


def sharded_engine() -> str | None:
    """'FSDP' or 'DeepSpeed' when `accelerate launch` was given such a config (it says so in the environment)."""
    return next((name for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
                 if os.environ.get(flag, "").lower() in ("1", "true", "yes")), None)


def refuse_sharded_engine(stage: str) -> None:
    """PPO keeps several adapters on one base; under FSDP / DeepSpeed ZeRO that is known to hang or break
    (peft #2834, trl #3371). Stop before loading, with what to use instead."""
    engine = sharded_engine()
    if engine is not None:
        raise LoraRlhfError(
            f"`{stage}` does not run under {engine}: its policy, reference, reward and value adapters share one base, "
            "and several adapters on one sharded base hang or break (peft #2834, trl #3371)",
            fix="launch it with plain data parallelism (recipes/accelerate/ddp_1node.yaml or torchrun); the 4-bit "
                "base is replicated on every GPU (an 8B base takes ~5.5 GB). FSDP/ZeRO configs are for sft and reward")
