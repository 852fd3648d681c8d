"""What sft and reward share: resuming from the newest complete checkpoint, and the output folder's marker."""

from __future__ import annotations

import logging

from lora_rlhf.stages.trainer_setup import last_checkpoint, prepare_output


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
    assert "checkpoint-10: it has no trainer_state.json" in caplog.text and "checkpoint-6" in caplog.text
    assert last_checkpoint(tmp_path / "nothing-here") is None


def test_a_new_run_removes_the_marker_first_and_resume_keeps_the_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "lora_rlhf.json").write_text("{}")
    prepare_output(tmp_path, resume=True)
    assert not (tmp_path / "lora_rlhf.json").exists() and (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    prepare_output(tmp_path, resume=False)
    assert not (tmp_path / "checkpoints").exists()
