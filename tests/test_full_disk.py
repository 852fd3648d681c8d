"""A full disk in sft, reward, ppo and eval: one line naming the file, exit 2, nothing marked complete.

Python's own writes fail with OSError(ENOSPC), but safetensors, torch.save and the tokenizer's writer do not: they
raise errors without an errno (their real messages on a full 1 MB tmpfs are copied below), and the commands
printed a traceback with exit 1. The failures are injected at the libraries' own write calls.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
import yaml
from helpers import recipe_dict, write_jsonl
from safetensors import SafetensorError
from typer.testing import CliRunner

from lora_rlhf.core import io
from lora_rlhf.core.adapters import META_FILE, is_finished
from lora_rlhf_cli.main import app

# What each library raised on a full tmpfs (safetensors 0.8, torch 2.13, tokenizers via transformers 5.23).
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # no hint of the disk
TOKENIZERS_FULL = "No space left on device (os error 28)"

runner = CliRunner()


def write_recipe(tmp_path: Path, model_dir: Path, **sections) -> Path:
    recipe = recipe_dict(model_dir, tmp_path / "run", "none", cpu=True, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         **sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def fail_safetensors(monkeypatch, under: Path, name: str = "adapter_model.safetensors") -> None:
    import safetensors.torch as st

    real = st.serialize_file

    def serialize_file(tensors, filename, *args, **kwargs):
        if str(filename).startswith(str(under)) and Path(filename).name == name:
            raise SafetensorError(SAFETENSORS_FULL)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(st, "serialize_file", serialize_file)


def fail_torch_save(monkeypatch, under: Path) -> None:
    """torch.save's error says nothing of the disk: the free space then tells (here: none left)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).startswith(str(under)):
            monkeypatch.setattr(io, "free_space", lambda path: 0)  # the disk is full from here on
            raise RuntimeError(TORCH_FULL)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def one_line_exit_2(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def test_sft_final_save_on_a_full_disk(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "Say it.", "completion": "banana"}] * 2)
    recipe = write_recipe(tmp_path, tiny_model_dir, data={"sft": {"path": str(data)}},
                          sft={"max_steps": 1, "save_strategy": "no"})
    out = tmp_path / "run" / "sft"
    fail_safetensors(monkeypatch, out)
    one_line_exit_2(runner.invoke(app, ["sft", str(recipe)]),
                    f"no space left on the device while writing {out} ({out / 'adapter_model.safetensors'})",
                    "nothing was marked complete")
    assert not is_finished(out)


def test_sft_checkpoint_on_a_full_disk_where_torch_save_names_no_disk(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "Say it.", "completion": "banana"}] * 2)
    recipe = write_recipe(tmp_path, tiny_model_dir, data={"sft": {"path": str(data)}},
                          sft={"max_steps": 2, "save_steps": 1})
    out = tmp_path / "run" / "sft"
    fail_torch_save(monkeypatch, out / "checkpoints")
    one_line_exit_2(runner.invoke(app, ["sft", str(recipe)]),
                    f"no space left on the device while writing {out} ({out / 'checkpoints'})")
    assert not (out / META_FILE).exists()


def test_reward_tokenizer_save_on_a_full_disk(tiny_model_dir, tmp_path, monkeypatch):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    rows = [{"prompt": f"Item {i}?", "responses": ["a banana", "red blue"], "ranks": [1, 2]} for i in range(4)]
    data = write_jsonl(tmp_path / "rank.jsonl", rows)
    recipe = write_recipe(tmp_path, tiny_model_dir, data={"reward": {"path": str(data)}},
                          reward={"max_steps": 1, "save_strategy": "no", "eval_strategy": "no", "normalize": False})
    out = tmp_path / "run" / "reward"
    real = TokenizersBackend._save_pretrained

    def tokenizer_save(self, save_directory, *args, **kwargs):
        if Path(save_directory) == out:
            raise Exception(TOKENIZERS_FULL)  # what the tokenizer's Rust writer raises: a bare Exception
        return real(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(TokenizersBackend, "_save_pretrained", tokenizer_save)
    one_line_exit_2(runner.invoke(app, ["reward", str(recipe)]),
                    f"no space left on the device while writing {out}", "nothing was marked complete")
    assert not is_finished(out, "reward")


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_reward_and_dpo_checkpoints_on_a_full_disk_name_the_checkpoint_folder(tiny_model_dir, tmp_path, monkeypatch,
                                                                               stage):
    rows = [{"prompt": f"Item {i}?", "responses": ["a banana", "red blue"], "ranks": [1, 2]} for i in range(4)]
    data = write_jsonl(tmp_path / "rank.jsonl", rows)
    recipe = write_recipe(tmp_path, tiny_model_dir, data={"reward": {"path": str(data)}},
                          **{stage: {"max_steps": 2, "save_steps": 1, "eval_strategy": "no"}})
    out = tmp_path / "run" / stage
    fail_torch_save(monkeypatch, out / "checkpoints")
    one_line_exit_2(runner.invoke(app, [stage, str(recipe)]),
                    f"no space left on the device while writing {out} ({out / 'checkpoints'})")
    assert not (out / META_FILE).exists()


def test_ppo_checkpoint_on_a_full_disk(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "rewards.py").write_text("def count_e(prompts, responses):\n"
                                         "    return [float(r.count('e')) for r in responses]\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Say something.", "2+2?")])
    recipe = write_recipe(tmp_path, tiny_model_dir, data={"prompts": {"path": str(prompts)}},
                          ppo={"total_episodes": 2, "batch_size": 2, "local_rollout_forward_batch_size": 2,
                               "response_length": 3, "num_ppo_epochs": 1, "save_steps": 1,
                               "reward_fn": f"{tmp_path / 'rewards.py'}:count_e"})
    out = tmp_path / "run" / "ppo"
    fail_torch_save(monkeypatch, out)
    one_line_exit_2(runner.invoke(app, ["ppo", str(recipe)]),
                    f"no space left on the device while writing {out / 'checkpoint.tmp' / 'optimizer.pt'}")
    assert not is_finished(out / "policy")


def test_ppo_final_adapter_on_a_full_disk(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "rewards.py").write_text("def zero(prompts, responses):\n    return [0.0] * len(responses)\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Say something.", "2+2?")])
    recipe = write_recipe(tmp_path, tiny_model_dir, data={"prompts": {"path": str(prompts)}},
                          ppo={"total_episodes": 2, "batch_size": 2, "local_rollout_forward_batch_size": 2,
                               "response_length": 3, "num_ppo_epochs": 1, "save_steps": 100,
                               "reward_fn": f"{tmp_path / 'rewards.py'}:zero"})
    out = tmp_path / "run" / "ppo"
    fail_safetensors(monkeypatch, out / "policy")
    one_line_exit_2(runner.invoke(app, ["ppo", str(recipe)]),
                    f"no space left on the device while writing {out / 'policy' / 'adapter_model.safetensors'}")
    assert not is_finished(out / "policy")


def test_eval_names_the_file_a_full_disk_stopped(tiny_model_dir, tmp_path, monkeypatch):
    """A failed write() raises OSError(ENOSPC) without a filename (unlike open()): eval said 'a file'."""
    from lora_rlhf.stages.eval import report

    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Describe snow."}])
    recipe = write_recipe(tmp_path, tiny_model_dir, data={"eval": {"path": str(prompts)}},
                          eval={"max_new_tokens": 3, "num_samples": 1})

    def plot_on_a_full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "plot_scores", plot_on_a_full_disk)
    out = tmp_path / "run" / "eval"
    one_line_exit_2(runner.invoke(app, ["eval", str(recipe)]),
                    f"no space left on the device while writing {out / 'scores.png'}")
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("error, free, full", [
    (OSError(errno.ENOSPC, "No space left on device"), 10**12, True),
    (OSError(errno.EACCES, "Permission denied"), 0, False),  # an errno is taken at its word
    (SafetensorError(SAFETENSORS_FULL), 10**12, True),
    (RuntimeError(TORCH_FULL), 0, True),
    (RuntimeError(TORCH_FULL), 10**12, False),  # the same error with room left: not a full disk
    (ValueError("a bug"), 10**12, False),
])
def test_disk_full_reads_errnos_library_messages_and_free_space(monkeypatch, tmp_path, error, free, full):
    import shutil

    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    assert io.disk_full(error, tmp_path / "x.safetensors") is full
