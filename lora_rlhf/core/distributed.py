"""Data parallelism: which process this is, and the few collectives the stages need.

Processes are started by the engines users already run, `torchrun` or `accelerate launch`, never by us: both
set RANK / WORLD_SIZE / LOCAL_RANK. accelerate's `PartialState` reads them, initialises torch.distributed
(NCCL on GPUs, gloo on the CPU) and is the same object TRL's trainers use, so our stages and theirs agree on
the process group. A plain `lora-rlhf ...` is a world of one: every function here is then a no-op that
returns its input, and no process group is created.

Two rules every collective here follows:
- its tensors live on `device()`, the rank's own device as accelerate chose it: NCCL serves CUDA tensors only
  (gloo, which the CPU tests use, takes anything, so only these functions' own care keeps a GPU run working);
- the ranks first meet in the launcher's key-value store (`_arrive`), with the recipe's timeout
  (`distributed.timeout_minutes`): a rank that never comes is then named, on any backend, instead of NCCL's
  watchdog killing the job after its own 10 minutes or gloo waiting 30 without saying for whom.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from lora_rlhf.errors import LoraRlhfError
from lora_rlhf.recipe.config import DistributedConfig, Recipe

_settings = {"timeout": timedelta(minutes=DistributedConfig().timeout_minutes), "cpu": False}
_arrivals = [0]  # collectives this process has entered: the ranks count alike, so the n-th is the same everywhere


def launched() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cpu_requested() -> bool:
    """The launch asked for the CPU (ACCELERATE_USE_CPU=1), or the recipe did (model.device: cpu)."""
    from accelerate.utils import parse_flag_from_env

    return bool(parse_flag_from_env("ACCELERATE_USE_CPU")) or bool(_settings["cpu"])


def configure(recipe: Recipe) -> None:
    """Take the recipe's collective timeout and device before the stage's first collective (every stage calls
    this first). The process group is made here under a launcher, with that timeout; a group made earlier in the
    process (an earlier stage of `pipeline`) gets the new timeout."""
    _settings["timeout"] = timedelta(minutes=recipe.distributed.timeout_minutes)
    _settings["cpu"] = recipe.model.device == "cpu"
    if not launched():
        return
    if torch.distributed.is_initialized():
        # A private helper (torch >= 2.3), the one way to change a made group's timeout, for NCCL and gloo alike.
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(_settings["timeout"])
    state()


def state() -> Any:
    """accelerate's process state (a singleton), initialised on first use.

    On a machine without CUDA, with ACCELERATE_USE_CPU=1, or for a recipe on the CPU, the ranks talk over gloo on
    the CPU: PartialState only picks that when told (`cpu=True`), otherwise it would silently make every rank a
    world of one (or, on a GPU machine, NCCL, which cannot carry the CPU tensors of a CPU run).
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu_requested() or not torch.cuda.is_available(), timeout=_settings["timeout"])


def world_size() -> int:
    return state().num_processes if launched() else 1


def rank() -> int:
    return state().process_index if launched() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU: `cuda` becomes the device accelerate's state chose for this rank. It applies
    LOCAL_RANK % the number of visible GPUs and makes it the current device, so a rank that sees one GPU
    (SLURM --gpus-per-task=1, CUDA_VISIBLE_DEVICES per process) gets its cuda:0, where `cuda:LOCAL_RANK` would
    ask rank 1+ for a device it does not have."""
    if device.type != "cuda" or device.index is not None or not launched():
        return device
    chosen = state().device
    if chosen.type != "cuda":
        raise LoraRlhfError("model.device is 'cuda', but this launch runs its ranks on the CPU "
                            "(ACCELERATE_USE_CPU=1)", fix="unset ACCELERATE_USE_CPU, or set model.device: cpu")
    return chosen


def device() -> torch.device:
    """Where this rank's collectives put their tensors: its GPU under NCCL, the CPU under gloo."""
    return state().device if launched() else torch.device("cpu")


def _store() -> Any:
    """The process group's key-value store (torchrun's agent holds it, so it answers while any rank hangs)."""
    from torch.distributed.distributed_c10d import _get_default_store  # private, stable since torch 1.x

    return _get_default_store()


def _arrive(what: str) -> None:
    """Meet the other ranks before a collective, waiting at most the recipe's timeout; on a timeout, stop with
    the ranks that never came. Each rank leaves one key per collective in the store (and removes its previous
    one, which every rank has passed once all are here)."""
    if not launched():
        return
    _arrivals[0] += 1
    n, me, world, store = _arrivals[0], rank(), world_size(), _store()
    key = "lora_rlhf/arrived/{}/{}".format
    store.set(key(n, me), what)
    timeout = _settings["timeout"]
    try:
        store.wait([key(n, r) for r in range(world)], timeout)
    except torch.distributed.DistStoreError:
        missing = _missing(store, [key(n, r) for r in range(world)])
        if missing:
            ranks = ("ranks " if len(missing) > 1 else "rank ") + ", ".join(str(r) for r in missing)
            raise LoraRlhfError(
                f"rank {me} waited {timeout.total_seconds() / 60:g} min at {what} (collective #{n} of this run) "
                f"for {ranks}, which never reached it: hung (stopped, deadlocked) or far slower than the others",
                fix=f"see what rank {missing[0]} was doing (its last log lines; `py-spy dump --pid PID`); when a rank "
                    "legitimately works alone that long (rank 0's reward check on a large model), raise "
                    "distributed.timeout_minutes") from None
    if n > 1:
        store.delete_key(key(n - 1, me))


def _missing(store: Any, keys: list[str]) -> list[int]:
    """The ranks whose key is absent. A store that does not answer either lives in rank 0's own process (a
    launch without torchrun's agent store) and rank 0 is the one stopped, or cannot be asked: then rank 0."""
    previous = store.timeout
    try:
        store.set_timeout(timedelta(seconds=10))
        return [r for r, k in enumerate(keys) if not store.check([k])]
    except RuntimeError:
        return [0]
    finally:
        store.set_timeout(previous)


def barrier(what: str = "a barrier") -> None:
    """Every rank waits here until all have come. `what` names the place in a timeout's message."""
    _arrive(what)


def finish() -> None:
    """Tear the process group down once every rank is done. Left to the interpreter's exit, gloo's threads are
    destroyed while still joinable and a rank aborts ("terminate called without an active exception", SIGABRT:
    1 launch in ~30 here), failing a run whose work had all been written. Call it on success only: a rank that
    failed must not wait in a barrier for the others."""
    if launched() and torch.distributed.is_initialized():
        barrier("the end of the command")
        state().destroy_process_group()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (pickled: keep it small, tensors on the CPU; torch moves
    the pickled bytes through the current device, which accelerate set to this rank's GPU under NCCL)."""
    if not launched():
        return [obj]
    _arrive("gather_objects")
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, [n_r, ...] -> [sum of n_r, ...] in rank order, where ranks hold different numbers of rows
    (a plain all_gather needs equal shapes: gloo aborts the process on a mismatch, NCCL may hang). A scalar counts
    as one row, as in accelerate's gather. No gradient."""
    if not launched():
        return tensor
    _arrive("gather_rows")
    home, here = tensor.device, device()
    tensor = (tensor.reshape(1) if tensor.dim() == 0 else tensor).to(here)
    count = torch.tensor([tensor.shape[0]], device=here)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    torch.distributed.all_gather(counts, count)
    padded = tensor.new_zeros((int(max(counts).item()), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(n.item())] for part, n in zip(parts, counts, strict=True)]).to(home)


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
    _arrive("broadcast_object")
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` over ranks, in place, in one collective (they are flattened into one buffer on `device()`)."""
    if not launched() or not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    _arrive("all_reduce_sum_")
    flat = _flatten_dense_tensors(tensors).to(device())
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(reduced)


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Overwrite `tensors` on every rank with rank 0's, in place."""
    if not launched():
        return
    _arrive("broadcast_")
    here = device()
    with torch.no_grad():
        for t in tensors:
            if t.device == here:
                torch.distributed.broadcast(t.data, src=0)
            else:  # a tensor off the rank's device goes through a copy on it
                copy = t.data.to(here)
                torch.distributed.broadcast(copy, src=0)
                t.data.copy_(copy)


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
    _arrive("max_over_ranks")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device())
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
