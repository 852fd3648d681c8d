"""Killed at each write: every stage is stopped at its 1st, 2nd, 3rd... file write, until a run gets through.

Each file write under the run folder (open for writing, mkdir, rename/replace, safetensors, torch.save, the
tokenizer's own writer) is counted; at the n-th the folder is copied as it stands - what a kill at that moment
leaves on disk, since no cleanup runs - and the write fails with ENOSPC, a full disk. After each:
- the full disk: the stage says so in one error, and is not marked complete;
- the kill: the copy is not marked complete either, and running the stage again on it finishes it, with the
  same outputs as a run that was never interrupted.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import randomize_adapter, recipe_dict, write_jsonl
from safetensors.torch import load_file

from lora_rlhf.core.adapters import is_finished
from lora_rlhf.errors import StorageError
from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig, recipe_from_dict

DEMOS = [{"prompt": p, "completion": "banana banana"} for p in ["Say it.", "What is it?", "Tell me.", "Please."]]
RANKINGS = [{"prompt": f"Tell me about item {i}.", "responses": ["a banana here", "red blue", "green"],
             "ranks": [1, 2, 3]} for i in range(4)]
LABELER = "def by_length(prompt, responses):\n    return [len(r) + i / 10 for i, r in enumerate(responses)]\n"
REWARD_FN = "def count_e(prompts, responses):\n    return [float(r.count('e')) for r in responses]\n"


class WriteFaults:
    """Counts the writes under `root`; when armed, the `fail_at`-th copies `root` to `snapshot`, then fails."""

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)
        self.fail_at: int | None = None
        self.snapshot: Path | None = None
        self.count = 0
        self.failed_on: str | None = None
        self.seen: list[str] = []

    def arm(self, fail_at: int, snapshot: Path) -> None:
        self.fail_at, self.snapshot, self.count, self.failed_on, self.seen = fail_at, snapshot, 0, None, []

    def disarm(self) -> None:
        self.fail_at = None

    def hit(self, target: Any) -> None:
        if self.fail_at is None or not isinstance(target, (str, os.PathLike)):
            return
        path = os.path.realpath(os.fspath(target))
        if not path.startswith(self.root + os.sep):
            return
        self.count += 1
        self.seen.append(path)
        if self.count == self.fail_at:
            self.failed_on = path
            self.fail_at = None  # the copy below, and whatever cleanup runs after the error, write freely
            if os.path.isdir(self.root):  # else the kill left nothing, and the snapshot is absent too
                shutil.copytree(self.root, self.snapshot, symlinks=True)
            raise OSError(errno.ENOSPC, "No space left on device (injected)", path)


@pytest.fixture
def faults(monkeypatch, tmp_path) -> WriteFaults:
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    faults = WriteFaults(tmp_path / "run")
    real_open, real_os_open = builtins.open, os.open
    real_replace, real_rename, real_mkdir = os.replace, os.rename, os.mkdir
    real_torch_save, real_tokenizer_save = torch.save, TokenizersBackend._save_pretrained
    import safetensors.torch as st

    real_serialize = st.serialize_file

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            faults.hit(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            faults.hit(path)
        return real_os_open(path, flags, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        faults.hit(dst)
        return real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        faults.hit(dst)
        return real_rename(src, dst, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        # Only a mkdir that creates a folder writes: not one that fails on an existing folder (EEXIST, which
        # Path.mkdir may ignore) or on a missing parent (Path.mkdir then creates the parent and retries).
        if not os.path.exists(path) and os.path.isdir(os.path.dirname(os.path.abspath(path))):
            faults.hit(path)
        return real_mkdir(path, *args, **kwargs)

    def torch_save(obj, f, *args, **kwargs):
        faults.hit(f)
        return real_torch_save(obj, f, *args, **kwargs)

    def serialize_file(tensors, filename, *args, **kwargs):
        faults.hit(filename)
        return real_serialize(tensors, filename, *args, **kwargs)

    def tokenizer_save(self, save_directory, *args, **kwargs):
        faults.hit(Path(save_directory) / "tokenizer.json")  # written by the Rust tokenizer, not through open()
        return real_tokenizer_save(self, save_directory, *args, **kwargs)

    for target, name, value in ((builtins, "open", open_), (io, "open", open_), (os, "open", os_open),
                                (os, "replace", replace), (os, "rename", rename), (os, "mkdir", mkdir),
                                (torch, "save", torch_save), (st, "serialize_file", serialize_file),
                                (TokenizersBackend, "_save_pretrained", tokenizer_save)):
        monkeypatch.setattr(target, name, value)
    return faults


def picks(writes: int, every_write: bool) -> list[int]:
    """Which writes to fail: all of them, or (the quick variant) the first two, where the output folder is set up,
    about five spread over the run, and the last three, where the outputs and the completion marker are written."""
    if every_write:
        return list(range(1, writes + 1))
    stride = max(1, -(-writes // 5))
    return sorted({1, 2} | set(range(1, writes + 1, stride)) | set(range(max(1, writes - 2), writes + 1)))


def sweep(faults: WriteFaults, root: Path, tmp_path: Path, every_write: bool, *, start: Callable[[], None],
          run: Callable[[], Any], rerun: Callable[[], Any], complete: Callable[[], bool],
          check: Callable[[Path], None], after_full_disk: Callable[[], None] | None = None,
          after_kill: Callable[[], None] | None = None) -> int:
    """Fail the n-th write of `run` (see `picks`) and check what is left; return how many writes a run makes.

    `start` puts `root` in the state the stage starts from; `complete` is the stage's own completion test (the one
    `pipeline` uses); `check(reference)` asserts the finished outputs equal those of an uninterrupted run, whose
    output_dir was copied to `reference`. What a full disk or a kill must leave is, unless the stage says
    otherwise (`after_full_disk`, `after_kill`): a stage that is not marked complete.
    """
    def not_complete() -> None:
        assert not complete()

    after_full_disk, after_kill = after_full_disk or not_complete, after_kill or not_complete
    shutil.rmtree(root, ignore_errors=True)
    start()
    faults.arm(10**9, tmp_path / "unused")
    run()
    faults.disarm()
    writes, names = faults.count, faults.seen
    reference = tmp_path / "reference"
    shutil.copytree(root, reference, symlinks=True)
    for n in picks(writes, every_write):
        shutil.rmtree(root, ignore_errors=True)
        start()
        killed = tmp_path / f"killed-{n}"
        faults.arm(n, killed)
        where = f"write {n} of {writes} ({names[n - 1]})"
        try:
            run()
        except (OSError, StorageError) as e:
            faults.disarm()
            assert faults.failed_on is not None, f"{where}: failed without an injected fault: {e!r}"
            if isinstance(e, StorageError):
                assert "no space left" in str(e) and "nothing was marked complete" in str(e), str(e)
            try:
                after_full_disk()
            except AssertionError as e:
                raise AssertionError(f"full disk at {where}: {e}") from None
        else:  # the stage (or a library) swallowed the error: then it must not have cost anything
            faults.disarm()
            assert faults.failed_on is not None, f"{where}: the run made fewer writes than the first one"
            assert complete(), f"{where}: the error was swallowed and the stage is not complete"
            check(reference)
            shutil.rmtree(killed, ignore_errors=True)
            continue
        # The kill: the run folder as it was just before that write, no cleanup having run.
        shutil.rmtree(root, ignore_errors=True)
        if killed.exists():
            killed.rename(root)
        try:
            after_kill()
        except AssertionError as e:
            raise AssertionError(f"killed at {where}: {e}") from None
        rerun()
        assert complete(), f"killed at {where}: running the stage again did not finish it"
        check(reference)
    return writes


def same_tensors(folder: Path, reference: Path, name: str, atol: float = 1e-6) -> None:
    got, want = load_file(str(folder / name)), load_file(str(reference / name))
    assert got.keys() == want.keys(), name
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=f"{name}: {key}")


def same_text(folder: Path, reference: Path, *names: str) -> None:
    for name in names:
        assert (folder / name).read_text() == (reference / name).read_text(), name


def make_recipe(model_dir: Path, out: Path, **sections):
    return recipe_from_dict(recipe_dict(model_dir, out, "none", cpu=True, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                                        **sections))


# `make test` runs the sampled sweeps; `make test-all` (and CI) the sweeps at every write too, ~9 min on 2 cores.
EVERY_WRITE = [pytest.param(False, id="sampled"),
               pytest.param(True, id="every-write", marks=pytest.mark.exhaustive)]


# ---------------------------------------------------------------------------------------------------- sft
def sft_recipe(model_dir: Path, tmp_path: Path, learning_rate: float = 1e-2):
    data = write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    return make_recipe(model_dir, tmp_path / "run", data={"sft": {"path": str(data)}},
                       sft={"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 1, "logging_steps": 1,
                            "learning_rate": learning_rate})


def check_sft(out: Path) -> Callable[[Path], None]:
    def check(reference: Path) -> None:
        same_tensors(out, reference / "sft", "adapter_model.safetensors")
        same_text(out, reference / "sft", "recipe.yaml", "adapter_config.json")
        assert json.loads((out / "metrics.json").read_text())["train_rows"] == len(DEMOS)
        assert not out.with_name("sft.previous").exists()

    return check


@pytest.mark.parametrize("every_write", EVERY_WRITE)
def test_sft_killed_at_each_write_then_resumed(faults, tiny_model_dir, tmp_path, every_write):
    from lora_rlhf.stages.sft import run_sft

    recipe = sft_recipe(tiny_model_dir, tmp_path)
    out = recipe.stage_dir("sft")
    writes = sweep(faults, tmp_path / "run", tmp_path, every_write, start=lambda: None,
                   run=lambda: run_sft(recipe), rerun=lambda: run_sft(recipe, resume=True),
                   complete=lambda: is_finished(out), check=check_sft(out))
    assert writes > 30  # two checkpoints, the adapter, the tokenizer, the marker: the injection saw them all


@pytest.mark.parametrize("every_write", EVERY_WRITE)
def test_sft_over_a_finished_run_killed_at_each_write(faults, tiny_model_dir, tmp_path, every_write):
    """A new run over a finished one: a full disk puts the old run back; after a kill the old run is still there
    (in OUT/sft or OUT/sft.previous), and the next start puts it back and then replaces it."""
    from lora_rlhf.stages.sft import run_sft

    old = tmp_path / "old-run"
    shutil.copytree(run_sft(sft_recipe(tiny_model_dir, tmp_path, learning_rate=1e-3)), old)
    recipe = sft_recipe(tiny_model_dir, tmp_path)
    out = recipe.stage_dir("sft")

    def old_run_in(folder: Path) -> bool:
        return is_finished(folder) and (folder / "adapter_model.safetensors").read_bytes() == \
            (old / "adapter_model.safetensors").read_bytes()

    def back_in_place() -> None:
        assert old_run_in(out) and not out.with_name("sft.previous").exists()

    def kept() -> None:
        assert old_run_in(out) or (old_run_in(out.with_name("sft.previous")) and not is_finished(out))

    sweep(faults, tmp_path / "run", tmp_path, every_write, start=lambda: shutil.copytree(old, out),
          run=lambda: run_sft(recipe), rerun=lambda: run_sft(recipe), complete=lambda: is_finished(out),
          check=check_sft(out), after_full_disk=back_in_place, after_kill=kept)


# ---------------------------------------------------------------------------------------------------- reward
@pytest.mark.parametrize("every_write", EVERY_WRITE)
def test_reward_killed_at_each_write_then_resumed(faults, tiny_model_dir, tmp_path, every_write):
    from lora_rlhf.stages.reward import run_reward

    data = write_jsonl(tmp_path / "rankings.jsonl", RANKINGS)
    recipe = make_recipe(tiny_model_dir, tmp_path / "run", data={"reward": {"path": str(data)}},
                         reward={"max_steps": 2, "per_device_train_batch_size": 6, "save_steps": 1,
                                 "logging_steps": 1, "learning_rate": 1e-2, "normalize": False})
    out = recipe.stage_dir("reward")

    def check(reference: Path) -> None:
        for name in ("adapter_model.safetensors", "head.safetensors"):
            same_tensors(out, reference / "reward", name)
        same_text(out, reference / "reward", "recipe.yaml", "adapter_config.json")
        assert json.loads((out / "metrics.json").read_text())["global_step"] == 2

    writes = sweep(faults, tmp_path / "run", tmp_path, every_write, start=lambda: None,
                   run=lambda: run_reward(recipe), rerun=lambda: run_reward(recipe, resume=True),
                   complete=lambda: is_finished(out, "reward"), check=check)
    assert writes > 30


# ---------------------------------------------------------------------------------------------------- compare
@pytest.mark.parametrize("every_write", EVERY_WRITE)
def test_compare_over_an_earlier_run_killed_at_each_write(faults, tiny_model_dir, tmp_path, every_write):
    """compare's marker is rankings.jsonl: an earlier run's (another seed) must never stand beside this run's
    candidates."""
    from lora_rlhf.stages.compare import RANKINGS as RANKINGS_FILE
    from lora_rlhf.stages.compare import run_compare

    (tmp_path / "labeler.py").write_text(LABELER)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Hi there", "Count to three", "Why?")])

    def recipe_with_seed(seed: int):
        recipe = make_recipe(tiny_model_dir, tmp_path / "run", data={"prompts": {"path": str(prompts)}},
                             compare={"k": 2, "max_new_tokens": 4, "labeler": f"{tmp_path / 'labeler.py'}:by_length"})
        recipe.seed = seed
        return recipe

    old = tmp_path / "old-compare"
    shutil.copytree(run_compare(recipe_with_seed(1), progress=False), old)
    recipe = recipe_with_seed(0)
    out = recipe.stage_dir("compare")

    def check(reference: Path) -> None:
        same_text(out, reference / "compare", "recipe.yaml", "candidates.jsonl", RANKINGS_FILE)

    def old_or_not_complete() -> None:  # a kill before the first write leaves the earlier run as it was
        assert not (out / RANKINGS_FILE).is_file() or (out / "recipe.yaml").read_text() == \
            (old / "recipe.yaml").read_text() and (out / "candidates.jsonl").read_text() == \
            (old / "candidates.jsonl").read_text()

    sweep(faults, tmp_path / "run", tmp_path, every_write, start=lambda: shutil.copytree(old, out),
          run=lambda: run_compare(recipe, progress=False), rerun=lambda: run_compare(recipe, progress=False),
          complete=lambda: (out / RANKINGS_FILE).is_file(), check=check, after_full_disk=old_or_not_complete,
          after_kill=old_or_not_complete)


# ---------------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("every_write", EVERY_WRITE)
def test_eval_killed_at_each_write(faults, tiny_model_dir, tmp_path, every_write):
    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.stages.eval.evaluate import EVAL_DIR, RESULTS_FILE, run_eval

    sft = tmp_path / "sft-adapter"
    shared = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"))
    shared.add_adapter("policy", LoraSettings(r=4, alpha=8, dropout=0.0))
    randomize_adapter(shared, "policy", std=0.3)
    shared.save_adapter("policy", sft, stage="sft")
    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"Describe topic {i}."} for i in range(3)])
    recipe = make_recipe(tiny_model_dir, tmp_path / "run", data={"eval": {"path": str(prompts)}},
                         eval={"max_new_tokens": 6, "num_samples": 2, "batch_size": 4})
    out = recipe.stage_dir(EVAL_DIR)

    def results(folder: Path) -> dict:
        data = json.loads((folder / RESULTS_FILE).read_text())
        # timings and memory peaks are measurements of the run, not results
        data["settings"] = {k: v for k, v in data["settings"].items() if not k.startswith(("seconds", "memory/"))}
        return data

    def check(reference: Path) -> None:
        assert results(out) == results(reference / EVAL_DIR)
        same_text(out, reference / EVAL_DIR, "responses.jsonl")
        assert (out / "report.md").is_file()

    sweep(faults, tmp_path / "run", tmp_path, every_write, start=lambda: shutil.copytree(sft, recipe.stage_dir("sft")),
          run=lambda: run_eval(recipe), rerun=lambda: run_eval(recipe),
          complete=lambda: (out / RESULTS_FILE).is_file(), check=check)


# ---------------------------------------------------------------------------------------------------- ppo
@pytest.mark.parametrize("every_write", EVERY_WRITE)
def test_ppo_killed_at_each_write_then_continued(faults, tiny_model_dir, tmp_path, every_write):
    """Two PPO steps, a checkpoint after each, with a value adapter (GAE); rerun as the pipeline does (continue
    from the checkpoint when there is one)."""
    from lora_rlhf.stages.ppo.trainer import train_ppo

    (tmp_path / "rewards.py").write_text(REWARD_FN)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Say something.", "2+2?", "Hi!")])
    recipe = make_recipe(tiny_model_dir, tmp_path / "run", data={"prompts": {"path": str(prompts)}},
                         ppo={"total_episodes": 4, "batch_size": 2, "local_rollout_forward_batch_size": 2,
                              "response_length": 4, "num_ppo_epochs": 1, "num_mini_batches": 1,
                              "learning_rate": 1e-3, "save_steps": 1, "sample_every": 1,
                              "reward_fn": f"{tmp_path / 'rewards.py'}:count_e"})
    out = recipe.stage_dir("ppo")

    def check(reference: Path) -> None:
        for role in ("policy", "value"):
            same_tensors(out / role, reference / "ppo" / role, "adapter_model.safetensors")
        same_tensors(out / "value", reference / "ppo" / "value", "head.safetensors")
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        assert json.loads((out / "metrics.json").read_text())["step"] == 2

    writes = sweep(faults, tmp_path / "run", tmp_path, every_write, start=lambda: None,
                   run=lambda: train_ppo(recipe, progress=False), rerun=lambda: train_ppo(recipe, progress=False),
                   complete=lambda: is_finished(out / "policy"), check=check)
    assert writes > 40


def test_a_full_disk_in_any_command_is_one_line_and_exit_2(faults, tiny_model_dir, tmp_path):
    """Beyond sft and reward (which name their run folder): the CLI turns ENOSPC into one message naming the file."""
    import yaml
    from typer.testing import CliRunner

    from lora_rlhf_cli.main import app

    (tmp_path / "labeler.py").write_text(LABELER)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi there"}, {"prompt": "Why?"}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_model_dir), "device": "cpu"},
        "quantization": {"mode": "none"}, "data": {"prompts": {"path": str(prompts)}},
        "compare": {"k": 2, "max_new_tokens": 3, "labeler": f"{tmp_path / 'labeler.py'}:by_length"}}))
    faults.arm(3, tmp_path / "killed")  # compare's folder, its recipe.yaml, then candidates.jsonl
    result = CliRunner().invoke(app, ["compare", str(recipe)])
    assert result.exit_code == 2, result.output
    assert f"no space left on the device while writing {tmp_path / 'run' / 'compare' / 'candidates.jsonl.tmp'}" \
        in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "compare" / "rankings.jsonl").exists()
