"""What sft and reward share: resuming from the newest complete checkpoint, and the output folder's marker."""

from __future__ import annotations

import logging

import pytest

from lora_rlhf.recipe.config import TRAINER_DEFAULTS, recipe_from_dict
from lora_rlhf.stages.trainer_setup import last_checkpoint, output_folder, trainer_args


def test_resume_skips_a_checkpoint_whose_save_was_interrupted(tmp_path, caplog):
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-latest.txt").write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING):
        # by step number, not by name: checkpoint-10 sorts before checkpoint-4 as text
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "checkpoint-4")
    assert "checkpoint-10: it has no complete trainer_state.json" in caplog.text and "checkpoint-6" in caplog.text
    assert last_checkpoint(tmp_path / "nothing-here") is None


def finished_run(folder, tag):
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_text(tag)
    (folder / "lora_rlhf.json").write_text("{}")


def test_a_failing_new_run_leaves_the_finished_one_in_place(tmp_path):
    out = tmp_path / "sft"
    finished_run(out, "old")
    with pytest.raises(ValueError), output_folder(out, resume=False):
        assert not (out / "lora_rlhf.json").exists()  # while the new run works, nothing here looks finished
        (out / "recipe.yaml").write_text("new")
        raise ValueError("per_device_train_batch_size must be positive")  # e.g. TRL refusing a value
    assert (out / "adapter_model.safetensors").read_text() == "old" and (out / "lora_rlhf.json").is_file()
    assert not (out / "recipe.yaml").exists() and not (tmp_path / "sft.previous").exists()


def test_a_kill_during_the_new_run_is_undone_at_the_next_start(tmp_path):
    out = tmp_path / "sft"
    finished_run(out, "old")
    runs = output_folder(out, resume=False)
    runs.__enter__()  # ... and the process is killed: no exit handler runs
    (out / "half.bin").write_text("x")
    assert (tmp_path / "sft.previous" / "lora_rlhf.json").is_file()
    with output_folder(out, resume=False):  # the next start restores, then replaces again
        assert (tmp_path / "sft.previous" / "adapter_model.safetensors").read_text() == "old"
        (out / "lora_rlhf.json").write_text("{}")
    assert not (tmp_path / "sft.previous").exists() and not (out / "half.bin").exists()


def test_a_successful_new_run_replaces_the_old_one(tmp_path):
    out = tmp_path / "sft"
    finished_run(out, "old")
    with output_folder(out, resume=False):
        (out / "adapter_model.safetensors").write_text("new")
        (out / "lora_rlhf.json").write_text("{}")
    assert (out / "adapter_model.safetensors").read_text() == "new" and not (out / "checkpoints").exists()
    assert not (tmp_path / "sft.previous").exists()


def test_resume_drops_the_marker_first_and_keeps_the_checkpoints(tmp_path):
    finished_run(tmp_path, "old")
    with output_folder(tmp_path, resume=True):
        assert not (tmp_path / "lora_rlhf.json").exists()
        assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()


def test_resume_skips_a_checkpoint_whose_trainer_state_was_cut_short(tmp_path):
    for step, state in ((2, "{}"), (4, '{"global_step": 4, "log_hist')):  # the Trainer writes it in place
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "checkpoint-2")


def test_resume_after_a_killed_replacement_continues_the_new_run_and_keeps_the_old_one_until_it_finishes(tmp_path):
    out = tmp_path / "sft"
    finished_run(out, "old")
    runs = output_folder(out, resume=False)
    runs.__enter__()  # the new run starts, writes a checkpoint, and is killed
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(ValueError), output_folder(out, resume=True):  # --resume, which fails too
        assert (out / "checkpoints" / "checkpoint-1").is_dir()  # the new run's checkpoint, not the old run's
        raise ValueError
    assert (tmp_path / "sft.previous" / "adapter_model.safetensors").read_text() == "old"
    with output_folder(out, resume=True):  # --resume again, which finishes
        assert (out / "checkpoints" / "checkpoint-1").is_dir()
        (out / "lora_rlhf.json").write_text("{}")
    assert not (tmp_path / "sft.previous").exists()


def test_a_kill_while_the_replaced_run_was_being_deleted_is_finished_at_the_next_start(tmp_path):
    out = tmp_path / "sft"
    finished_run(out, "new")
    finished_run(tmp_path / "sft.previous", "old")  # the new run had finished; deleting the old one was cut short
    for resume in (False, True):
        with output_folder(out, resume=resume):
            (out / "lora_rlhf.json").write_text("{}")
        assert not (tmp_path / "sft.previous").exists()
        finished_run(tmp_path / "sft.previous", "old")


def test_a_full_disk_names_the_folder_and_says_nothing_was_marked_complete(tmp_path):
    import errno

    from lora_rlhf.errors import StorageError

    out = tmp_path / "sft"
    finished_run(out, "old")
    with pytest.raises(StorageError) as e, output_folder(out, resume=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "adapter_model.safetensors"))
    assert f"no space left on the device while writing {out}" in e.value.what
    assert "nothing was marked complete; the previous finished run is back in place" in e.value.what
    assert (out / "adapter_model.safetensors").read_text() == "old" and (out / "lora_rlhf.json").is_file()
    with pytest.raises(StorageError) as e, output_folder(tmp_path / "reward", resume=False):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "nothing was marked complete" in e.value.what and "--resume continues" in e.value.fix
    with pytest.raises(PermissionError), output_folder(tmp_path / "reward", resume=False):
        raise PermissionError(errno.EACCES, "Permission denied")  # other errors pass through as they are


@pytest.mark.parametrize("resume", [False, True])
def test_temporary_files_of_a_save_killed_half_way_do_not_end_up_in_the_finished_folder(tmp_path, resume):
    """A kill while the final save wrote the adapter left its 4.9 MB `.tmpXXXXXX` (safetensors writes through a
    temporary file, then renames it) in OUT/sft; the next run, fresh or resumed, finished around it."""
    out = tmp_path / "sft"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "adapter_model.safetensors").write_text("half a save")
    (out / ".tmpQx3Zr1").write_bytes(b"\0" * 1024)  # safetensors', cut short
    (out / "metrics.json.tmp").write_text('{"trai')  # core.io.write_text_atomic's, cut short
    with output_folder(out, resume=resume):
        (out / "lora_rlhf.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["adapter_model.safetensors", "lora_rlhf.json"]
    assert (out / "checkpoints" / "checkpoint-2").is_dir() == resume


def test_saving_an_adapter_clears_what_a_killed_save_left_in_its_folder(tmp_path, tiny_model_dir):
    """PPO re-saves policy/ and value/ into the folders a killed run left (the resumed run reuses them)."""
    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

    shared = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"))
    shared.add_adapter("policy", LoraSettings(r=4, alpha=8, dropout=0.0))
    folder = tmp_path / "ppo" / "policy"
    folder.mkdir(parents=True)
    (folder / ".tmpAbC123").write_bytes(b"\0" * 64)
    shared.save_adapter("policy", folder, stage="ppo")
    assert not list(folder.glob(".tmp*")) and not list(folder.glob("*.tmp"))
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_trainer_arguments_are_the_resolved_recipes_and_what_the_run_derives(tmp_path):
    recipe = recipe_from_dict({"model": {"device": "cpu", "gradient_checkpointing": True},
                               "reward": {"learning_rate": 3e-4}})
    args = trainer_args(recipe, "reward", tmp_path, eval_present=True)
    assert {k: args[k] for k in TRAINER_DEFAULTS["reward"]} == {**TRAINER_DEFAULTS["reward"], "learning_rate": 3e-4}
    # derived when the stage runs: held-out data, the model's checkpointing, precision on this device
    assert args["eval_strategy"] == "epoch" and args["gradient_checkpointing"] is True
    assert (args["bf16"], args["fp16"], args["use_cpu"]) == (False, False, True)
    assert "eval_strategy" not in trainer_args(recipe, "sft", tmp_path, eval_present=False)
