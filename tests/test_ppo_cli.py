"""`lora-rlhf ppo` through the CLI: outputs on disk, PPO-ptx, and the user errors that exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import FAST_PPO, PROMPTS, Stop, recipe_dict
from typer.testing import CliRunner

from lora_rlhf.recipe.config import load_recipe
from lora_rlhf_cli.main import app

runner = CliRunner()


@pytest.fixture
def run_dir(tiny_model_dir, tmp_path) -> Path:
    """A recipe folder with prompts and ptx text."""
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "ptx.jsonl").write_text("".join(json.dumps({"text": f"Some general text number {i}."}) + "\n"
                                                for i in range(5)))
    return tmp_path


def finish_steps_1_and_2(stage_adapters: tuple[Path, Path], run_dir: Path) -> None:
    """OUT/sft and OUT/reward: copies of the finished steps 1 and 2, found there without being named."""
    for folder in stage_adapters:
        shutil.copytree(folder, run_dir / "run" / folder.name)


def write_recipe(folder: Path, model_dir: Path, **ppo) -> Path:
    recipe = recipe_dict(model_dir, folder / "run", cpu=True,
                         data={"prompts": {"path": "prompts.jsonl"}, "ptx": {"path": "ptx.jsonl"}},
                         ppo={**FAST_PPO, **ppo})
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_ppo_writes_every_output(run_dir, tiny_model_dir, stage_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    finish_steps_1_and_2(stage_adapters, run_dir)
    recipe = write_recipe(run_dir, tiny_model_dir, ptx_coef=0.5, ptx_batch_size=2)
    result = runner.invoke(app, ["ppo", str(recipe), "--set", "ppo.kl_coef=0.1"])
    assert result.exit_code == 0, result.output
    assert "PPO policy written to" in result.output
    out = run_dir / "run" / "ppo"

    meta = json.loads((out / "policy" / "lora_rlhf.json").read_text())
    assert (meta["stage"], meta["role"]) == ("ppo", "policy")
    assert json.loads((out / "value" / "lora_rlhf.json").read_text())["head"]["file"] == "head.safetensors"
    assert (out / "value" / "head.safetensors").is_file()
    # a plain PEFT folder: no lora-rlhf needed to use the policy
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "policy"))

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # 8 episodes / batch of 4
    for key in ("objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward", "policy/approxkl",
                "policy/clipfrac", "loss/policy", "loss/value", "loss/ptx", "val/ratio", "kl_coef", "tokens/s",
                "time/generation", "time/scoring", "time/optimisation"):
        assert key in metrics[-1], key
    assert metrics[-1]["kl_coef"] == 0.1  # the --set override reached the trainer
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and {"prompt", "response", "score"} <= set(samples[0])
    assert yaml.safe_load((out / "recipe.yaml").read_text())["ppo"]["kl_coef"] == 0.1
    log = (out / "train.log").read_text()
    assert "step 2/2" in log and "samples at step 1" in log
    run = json.loads((out / "run.json").read_text())
    assert run["roles"]["reward"].endswith("reward") and run["roles"]["reference"].endswith("sft")
    assert json.loads((out / "metrics.json").read_text())["step"] == 2

    # a second run over the finished one must be asked for explicitly
    result = runner.invoke(app, ["ppo", str(recipe)])
    assert result.exit_code == 2 and "--resume" in result.output
    # and a checkpoint only continues with the settings it was written with
    result = runner.invoke(app, ["ppo", str(recipe), "--resume", "--set", "lora.r=4"])
    assert result.exit_code == 2 and "lora.r was 8" in result.output
    # a KL setting too: the checkpoint's KL controller would silently replace a new kl_coef
    result = runner.invoke(app, ["ppo", str(recipe), "--resume", "--set", "ppo.kl_coef=0.1", "--set", "ppo.kl_coef=0.2",
                                 "--set", "ppo.adaptive_kl=true"])
    assert result.exit_code == 2 and "ppo.kl_coef was 0.1 when the checkpoint was written, now 0.2" in result.output
    assert "continue this run with --set ppo.kl_coef=0.1, or start a new run" in result.output
    assert "ppo.adaptive_kl was False" in result.output and "--set ppo.adaptive_kl=false" in result.output
    result = runner.invoke(app, ["ppo", str(recipe), "--resume", "--set", "ppo.kl_coef=0.1"])  # as it was: resumes
    assert result.exit_code == 0 and "PPO policy written to" in result.output, result.output


def test_cli_ppo_without_a_reward_exits_2(run_dir, tiny_model_dir):
    recipe = write_recipe(run_dir, tiny_model_dir)
    result = runner.invoke(app, ["ppo", str(recipe)])
    assert result.exit_code == 2
    assert "PPO has no reward" in result.output and "lora-rlhf reward" in result.output
    assert not (run_dir / "run" / "ppo").exists()  # nothing written before the check


def test_cli_ppo_resume_without_checkpoint_exits_2(run_dir, tiny_model_dir):
    (run_dir / "my_rewards.py").write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    recipe = write_recipe(run_dir, tiny_model_dir, reward_fn=f"{run_dir}/my_rewards.py:score")
    result = runner.invoke(app, ["ppo", str(recipe), "--resume"])
    assert result.exit_code == 2 and "holds no PPO checkpoint" in result.output


def test_cli_ppo_bad_reward_function_exits_2(run_dir, tiny_model_dir):
    recipe = write_recipe(run_dir, tiny_model_dir, reward_fn="no_such_module_xyz:score")
    result = runner.invoke(app, ["ppo", str(recipe)])
    assert result.exit_code == 2 and "no_such_module_xyz" in result.output


def test_cli_ppo_ptx_without_data_exits_2(run_dir, tiny_model_dir):
    recipe = write_recipe(run_dir, tiny_model_dir, ptx_coef=1.0, reward_fn=f"{run_dir}/r.py:f")
    (run_dir / "r.py").write_text("def f(p, r):\n    return [0.0] * len(r)\n")
    result = runner.invoke(app, ["ppo", str(recipe), "--set", "data.ptx=null"])
    assert result.exit_code == 2 and "no data.ptx" in result.output


def test_cli_ppo_ptx_rows_without_a_target_token_exit_2_before_anything_is_written(run_dir, tiny_model_dir):
    # every completion starts past ptx_max_length: no row has a token to learn
    (run_dir / "ptx.jsonl").write_text("".join(json.dumps({"prompt": "word " * 40, "completion": "end"}) + "\n"
                                               for _ in range(3)))
    (run_dir / "r.py").write_text("def f(p, r):\n    return [0.0] * len(r)\n")
    recipe = write_recipe(run_dir, tiny_model_dir, ptx_coef=1.0, ptx_max_length=8, reward_fn=f"{run_dir}/r.py:f")
    result = runner.invoke(app, ["ppo", str(recipe)])
    assert result.exit_code == 2 and "no data.ptx row keeps a target token" in result.output
    assert not (run_dir / "run" / "ppo").exists()


def test_cli_ppo_missing_tracker_package_exits_2(run_dir, tiny_model_dir, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    (run_dir / "r.py").write_text("def f(p, r):\n    return [0.0] * len(r)\n")
    recipe = write_recipe(run_dir, tiny_model_dir, reward_fn=f"{run_dir}/r.py:f", report_to=["wandb"])
    result = runner.invoke(app, ["ppo", str(recipe)])
    assert result.exit_code == 2 and "pip install wandb" in result.output
    assert not (run_dir / "run" / "ppo").exists()


def test_cli_ppo_rloo_trains_and_writes_the_policy_only(run_dir, tiny_model_dir, stage_adapters):
    """A value-free run: no value adapter is created, trained or written, and the run still checkpoints,
    finishes and says which roles it had."""
    finish_steps_1_and_2(stage_adapters, run_dir)
    recipe = write_recipe(run_dir, tiny_model_dir)
    result = runner.invoke(app, ["ppo", str(recipe), "--set", "ppo.advantage_estimator=rloo",
                                 "--set", "ppo.num_generations=2"])
    assert result.exit_code == 0, result.output
    out = run_dir / "run" / "ppo"
    assert (out / "policy" / "lora_rlhf.json").is_file() and not (out / "value").exists()
    assert not (out / "checkpoint" / "value").exists() and (out / "checkpoint" / "policy").is_dir()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss/value" not in metrics[-1] and "loss/policy" in metrics[-1]
    assert json.loads((out / "run.json").read_text())["roles"]["value"].startswith("none")


def test_rloo_with_one_sample_per_prompt_is_refused_before_loading(run_dir, tiny_model_dir):
    recipe = write_recipe(run_dir, tiny_model_dir)
    result = runner.invoke(app, ["ppo", str(recipe), "--set", "ppo.advantage_estimator=grpo"])
    assert result.exit_code == 2 and "set num_generations >= 2" in result.output


def test_a_kill_before_the_final_save_ends_leaves_the_stage_unfinished(run_dir, tiny_model_dir, stage_adapters,
                                                                       monkeypatch):
    """policy/lora_rlhf.json marks the PPO stage complete: a failure while writing value/ or metrics.json (a kill,
    a full disk) must leave it absent, so the pipeline reruns the stage instead of reporting it done."""
    from lora_rlhf.stages.pipeline import is_complete
    from lora_rlhf.stages.ppo import trainer as trainer_module

    finish_steps_1_and_2(stage_adapters, run_dir)
    recipe = write_recipe(run_dir, tiny_model_dir)
    real = trainer_module.write_json_atomic

    def killed(path, data, **kwargs):
        if Path(path).name == "metrics.json":
            raise KeyboardInterrupt  # the moment between the value adapter and the policy
        return real(path, data, **kwargs)

    monkeypatch.setattr(trainer_module, "write_json_atomic", killed)
    result = runner.invoke(app, ["ppo", str(recipe)])
    assert result.exit_code == 130
    out = run_dir / "run" / "ppo"
    assert (out / "value" / "lora_rlhf.json").is_file() and not (out / "policy" / "lora_rlhf.json").exists()
    assert not is_complete(load_recipe(recipe), "ppo")


def test_an_sft_adapter_for_another_base_is_refused_before_anything_is_written(run_dir, stage_adapters,
                                                                               other_tiny_model_dir):
    finish_steps_1_and_2(stage_adapters, run_dir)
    recipe = write_recipe(run_dir, other_tiny_model_dir)  # the adapters were trained on the tiny model
    result = runner.invoke(app, ["ppo", str(recipe)])
    assert result.exit_code == 2 and "was trained on base" in result.output
    assert not (run_dir / "run" / "ppo").exists()


def test_ppo_ptx_preflight_plans_the_lm_rows_at_the_longest_ptx_row(run_dir, tiny_model_dir, stage_adapters,
                                                                     monkeypatch):
    """`lora-rlhf ppo` with ptx_coef > 0 is PPO-ptx: its preflight plans the ptx rows, as long as the longest
    tokenised one (a ptx batch is padded to its longest row), not ppo.ptx_max_length, and the rollouts at the
    longest prompt; and it runs before the stage writes anything."""
    from lora_rlhf.core.data import load_prompts
    from lora_rlhf.core.loading import load_tokenizer
    from lora_rlhf.core.text import prompt_ids
    from lora_rlhf.stages.ppo import trainer as ppo_trainer
    from lora_rlhf.stages.ppo.ptx import tokenize_row

    rows = [{"text": "short"}, {"text": " ".join(["a much longer general text"] * 6)}, {"text": "mid sized text"}]
    (run_dir / "ptx.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finish_steps_1_and_2(stage_adapters, run_dir)
    recipe = load_recipe(write_recipe(run_dir, tiny_model_dir, ptx_coef=0.5, ptx_batch_size=2, ptx_max_length=256))
    seen = {}

    def planned(recipe, stage, sequence_length=None, prompt_length=None):
        seen.update(stage=stage, sequence_length=sequence_length, prompt_length=prompt_length)
        raise Stop

    monkeypatch.setattr(ppo_trainer, "check_memory", planned)
    with pytest.raises(Stop):
        ppo_trainer.train_ppo(recipe)
    tokenizer = load_tokenizer(recipe.model)
    longest = max(len(tokenize_row(tokenizer, r, 256)[0]) for r in rows)
    prompt = max(len(prompt_ids(tokenizer, p)) for p in load_prompts(recipe.data.prompts))
    assert seen == {"stage": "ppo-ptx", "sequence_length": longest, "prompt_length": prompt}
    assert 10 < longest < 256 and prompt > 5
    assert not (run_dir / "run" / "ppo").exists()


LONG_PROMPT = "Background: " + "the river runs past the old mill. " * 40 + "Question: what runs past the mill?"


def test_prompts_longer_than_max_prompt_length_are_cut_from_the_left_and_planned_as_cut(run_dir, tiny_model_dir,
                                                                                       stage_adapters, monkeypatch,
                                                                                       caplog):
    """~1,020-token prompts peaked at 8.9 GB against 1.4 GB: PPO had no prompt limit. Now a prompt over
    ppo.max_prompt_length keeps its end (the question), the template stays whole, and the preflight plans the
    longest prompt as it will be rolled out."""
    from lora_rlhf.core.loading import load_tokenizer
    from lora_rlhf.core.text import prompt_ids
    from lora_rlhf.stages.ppo import trainer as ppo_trainer

    conversation = [{"role": "system", "content": "You answer briefly. " * 30},
                    {"role": "user", "content": "Name a colour."}]
    (run_dir / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                   for p in ["Hi!", LONG_PROMPT, conversation]))
    finish_steps_1_and_2(stage_adapters, run_dir)
    recipe = load_recipe(write_recipe(run_dir, tiny_model_dir, max_prompt_length=64))
    tokenizer = load_tokenizer(recipe.model)
    assert len(prompt_ids(tokenizer, LONG_PROMPT)) > 300 and len(prompt_ids(tokenizer, conversation)) > 64
    seen = {}

    def planned(recipe, stage, sequence_length=None, prompt_length=None):
        seen["prompt_length"] = prompt_length

    def built(recipe, sources, prompts, *args, **kwargs):
        seen["prompts"] = prompts
        raise Stop

    monkeypatch.setattr(ppo_trainer, "check_memory", planned)
    monkeypatch.setattr(ppo_trainer, "build_trainer", built)
    with pytest.raises(Stop):
        ppo_trainer.train_ppo(recipe)
    short, cut, cut_conversation = seen["prompts"]
    assert short == "Hi!"
    assert cut.endswith("Question: what runs past the mill?") and len(cut) < len(LONG_PROMPT)
    assert cut_conversation[-1] == conversation[-1]  # the earlier (system) text went first
    lengths = [len(prompt_ids(tokenizer, p)) for p in seen["prompts"]]
    assert max(lengths[1:]) <= 64 and min(lengths[1:]) > 56  # cut to the limit, not far below it
    assert seen["prompt_length"] == max(lengths)
    assert "2 prompt(s) are longer than 64 tokens: 2 cut from the left, 0 dropped" in caplog.text


def test_long_prompts_drop_leaves_them_out_and_none_left_is_one_error(run_dir, tiny_model_dir, stage_adapters):
    (run_dir / "prompts.jsonl").write_text(json.dumps({"prompt": LONG_PROMPT}) + "\n")
    finish_steps_1_and_2(stage_adapters, run_dir)
    recipe = write_recipe(run_dir, tiny_model_dir, max_prompt_length=64, long_prompts="drop")
    result = runner.invoke(app, ["ppo", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "all 1 prompts of data.prompts are longer than ppo.max_prompt_length=64 tokens" in result.output
    assert "Traceback" not in result.output and not (run_dir / "run" / "ppo").exists()
