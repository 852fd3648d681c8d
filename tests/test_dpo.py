"""DPO on the tiny model: TRL's loss and gradients with the reference on the shared base, the reference is the SFT
adapter (not the bare base), one base copy, exact resume, frozen base and reference, bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from helpers import (
    banana_rankings,
    base_weights,
    randomize_adapter,
    recipe_dict,
    save_sft_adapter,
    write_jsonl,
)
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_rlhf.core.adapters import META_FILE
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.loading import load_tokenizer
from lora_rlhf.core.text import encode, prompt_ids
from lora_rlhf.errors import DataError, ModelError
from lora_rlhf.recipe.config import recipe_from_dict
from lora_rlhf.stages.dpo import (
    REFERENCE,
    build_trainer,
    dpo_training_args,
    load_dpo_data,
    tokenize_pairs,
    train_dpo,
)
from lora_rlhf.stages.eval.evaluate import sequence_logprobs
from lora_rlhf_cli.main import app

FAST = {"logging_steps": 1, "save_strategy": "no", "report_to": "none", "learning_rate": 1e-2}


def make_recipe(tiny_recipe, tmp_path, quantization="4bit", rows=None, sft=True, **dpo):
    data = write_jsonl(tmp_path / "rank.jsonl", rows if rows is not None else banana_rankings(6))
    recipe = recipe_from_dict(tiny_recipe(quantization, data={"reward": {"path": str(data)}}, dpo={**FAST, **dpo}))
    if sft:
        save_sft_adapter(recipe, recipe.stage_dir("sft"))
    return recipe


def sequence_sums(shared, role, batch_rows):
    """Per pair (chosen, rejected): summed log-probs of the answer tokens, by teacher forcing outside TRL."""
    seqs = [r["prompt_ids"] + r[c] for c in ("chosen_ids", "rejected_ids") for r in batch_rows]
    starts = [len(r["prompt_ids"]) for _ in range(2) for r in batch_rows]
    sums = torch.stack([x.sum() for x in sequence_logprobs(shared, role, seqs, starts)])
    return sums.chunk(2)


def trainer_on(recipe, tmp_path, **args):
    """Our DPOTrainer on a freshly loaded shared base whose `default` adapter is the recipe's SFT adapter."""
    tokenizer = load_tokenizer(recipe.model)
    train, _ = load_dpo_data(recipe)
    dataset, _ = tokenize_pairs(train, tokenizer, None)
    shared = SharedBase.load(recipe.model, recipe.quantization, tokenizer=tokenizer)
    shared.load_adapter("default", recipe.stage_dir("sft"), trainable=True)
    training_args = dpo_training_args(recipe, tmp_path / "out", False)
    for key, value in args.items():
        setattr(training_args, key, value)
    trainer = build_trainer(shared, training_args, dataset)
    rows = [dataset[i] for i in range(4)]
    return trainer, shared, rows, trainer.data_collator(rows)


# ---------------------------------------------------------------------------------------------- loss and reference
def test_loss_and_gradients_equal_trls_with_a_separately_loaded_reference(tiny_recipe, tmp_path):
    """TRL's DPOTrainer set up the usual way, the reference a second model (the SFT adapter merged into its own
    base copy), computes the same loss and policy gradients on the same batch as ours with the reference adapter
    on the shared base. The policy is moved off the reference first: at policy == reference the DPO gradient does
    not depend on the reference at all."""
    from peft import PeftModel
    from trl import DPOTrainer

    from lora_rlhf.core.loading import load_pretrained

    # the reference's forward in the step itself, in both (precomputed, TRL would read it from the batch)
    recipe = make_recipe(tiny_recipe, tmp_path, quantization="none", beta=0.5, precompute_ref_log_probs=False)
    ours, shared, _, batch = trainer_on(recipe, tmp_path)
    tokenizer, sft = shared.tokenizer, str(recipe.stage_dir("sft"))

    def base():
        return load_pretrained(recipe.model, recipe.quantization, tokenizer.pad_token_id)[0]

    reference = PeftModel.from_pretrained(base(), sft).merge_and_unload()
    policy = PeftModel.from_pretrained(base(), sft, is_trainable=True)
    prefs = [{"prompt": "Hi", "chosen": "Hello there", "rejected": "Go away"}] * 4
    import datasets

    theirs = DPOTrainer(model=policy, ref_model=reference, args=dpo_training_args(recipe, tmp_path / "trl", False),
                        train_dataset=datasets.Dataset.from_list(prefs), processing_class=tokenizer)
    assert REFERENCE not in theirs.model.peft_config and theirs.ref_model is not None  # a separate reference
    randomize_adapter(shared, "default", std=0.1, seed=7)
    moved = {n: p for n, p in ours.model.named_parameters() if ".default." in n}
    with torch.no_grad():
        for name, p in theirs.model.named_parameters():
            if ".default." in name:
                p.copy_(moved[name])
    losses, grads = [], []
    for trainer in (ours, theirs):
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if ".default." in n})
    assert abs(float(losses[0]) - math.log(2)) > 1e-3  # the policy really differs from the reference
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("precompute", [False, True])
def test_reference_log_probs_are_the_sft_adapters_not_the_bare_bases(tiny_recipe, tmp_path, precompute):
    """On the 4-bit shared base, the reference TRL computes is the SFT adapter's teacher-forced log-probability of
    each answer, in each step or precomputed once; with the adapters disabled (TRL's reference for a plain model +
    peft_config) it would be the base's, which differs."""
    recipe = make_recipe(tiny_recipe, tmp_path)
    trainer, shared, rows, batch = trainer_on(recipe, tmp_path, precompute_ref_log_probs=precompute)
    if precompute:
        ref_chosen, ref_rejected = (torch.tensor(trainer.train_dataset[f"ref_{c}_logps"][:4])
                                    for c in ("chosen", "rejected"))
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    check = SharedBase.load(recipe.model, recipe.quantization, for_training=False)
    check.load_adapter("sft", recipe.stage_dir("sft"))
    sft_chosen, sft_rejected = sequence_sums(check, "sft", rows)
    base_chosen, base_rejected = sequence_sums(check, None, rows)
    torch.testing.assert_close(ref_chosen, sft_chosen, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ref_rejected, sft_rejected, rtol=1e-4, atol=1e-3)
    assert (ref_chosen - base_chosen).abs().min() > 0.1 and (ref_rejected - base_rejected).abs().min() > 0.1


def test_without_sft_the_reference_is_the_bare_base(tiny_recipe, tmp_path):
    recipe = make_recipe(tiny_recipe, tmp_path, sft=False)
    tokenizer = load_tokenizer(recipe.model)
    dataset, _ = tokenize_pairs(load_dpo_data(recipe)[0], tokenizer, None)
    shared = SharedBase.load(recipe.model, recipe.quantization, tokenizer=tokenizer)
    shared.add_adapter("default", recipe.lora, trainable=True)
    trainer = build_trainer(shared, dpo_training_args(recipe, tmp_path / "out", False), dataset)
    rows = [dataset[i] for i in range(4)]
    with torch.no_grad():
        ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(rows)))
    check = SharedBase.load(recipe.model, recipe.quantization, for_training=False)
    torch.testing.assert_close(ref, torch.cat(sequence_sums(check, None, rows)), rtol=1e-4, atol=1e-3)


def test_one_base_copy_holds_policy_and_reference(tiny_recipe, tmp_path):
    import bitsandbytes as bnb

    recipe = make_recipe(tiny_recipe, tmp_path)
    trainer, shared, _, _ = trainer_on(recipe, tmp_path)
    assert trainer.ref_model is None  # no second model: the reference is an adapter of this one

    def base_layers(model):
        return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]

    one_base = SharedBase.load(recipe.model, recipe.quantization, for_training=False).model
    assert len(base_layers(trainer.model)) == len(base_layers(one_base)) > 0
    # every LoRA layer wraps one 4-bit base layer and holds both adapters: the policy and its frozen reference
    lora_layers = [m for m in trainer.model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert lora_layers and all(set(m.lora_A) == {"default", REFERENCE} for m in lora_layers)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora_layers)
    frozen = [p for n, p in trainer.model.named_parameters() if f".{REFERENCE}." in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_rows_are_the_ids_generation_and_the_reward_model_see(tiny_recipe, tmp_path):
    """The prompt is `prompt_ids` (what PPO and eval generate from), prompt + answer is `encode` (the reward model's
    ids, ending at the end-of-turn token): not TRL's own tokenisation. Pairs longer than max_length are dropped."""
    rows = [{"prompt": "Say hi.", "chosen": "hi there", "rejected": "no"},
            {"prompt": [{"role": "user", "content": "Count."}], "chosen": "one two three four five six",
             "rejected": "1"}]
    recipe = make_recipe(tiny_recipe, tmp_path, rows=rows, sft=False)
    tokenizer = load_tokenizer(recipe.model)
    comparisons = load_dpo_data(recipe)[0]
    dataset, dropped = tokenize_pairs(comparisons, tokenizer, None)
    assert dropped == 0
    for row, c in zip(dataset, comparisons, strict=True):
        assert row["prompt_ids"] == prompt_ids(tokenizer, c.prompt)
        assert row["prompt_ids"] + row["chosen_ids"] == encode(tokenizer, c.prompt, c.chosen)
        assert row["prompt_ids"] + row["rejected_ids"] == encode(tokenizer, c.prompt, c.rejected)
        assert row["chosen_ids"][-1] == tokenizer.eos_token_id  # the answer ends where generation stops
    longest = len(encode(tokenizer, comparisons[1].prompt, comparisons[1].chosen))
    kept, dropped = tokenize_pairs(comparisons, tokenizer, longest - 1)
    assert dropped == 1 and len(kept) == 1


# ---------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    data = write_jsonl(tmp / "rank.jsonl", banana_rankings(8))
    recipe = recipe_from_dict(recipe_dict(
        tiny_model_dir, tmp / "run", cpu=True, data={"reward": {"path": str(data), "eval_fraction": 0.25}},
        dpo={**FAST, "max_steps": 4, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 4}))
    save_sft_adapter(recipe, recipe.stage_dir("sft"))
    base_before = base_weights(SharedBase.load(recipe.model, recipe.quantization).model)
    out, shared = train_dpo(recipe)
    return recipe, out, shared, base_before


def test_output_folder_is_a_finished_policy_adapter(dpo_run):
    recipe, out, _, _ = dpo_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.json",
                 "train.log", META_FILE):
        assert (out / name).is_file(), name
    meta = json.loads((out / META_FILE).read_text())
    assert (meta["stage"], meta["role"], meta["quantization"]) == ("dpo", "policy", "4bit")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_pairs"] == 24 and metrics["eval_pairs"] == 8  # 6 + 2 prompts of 4 pairs, split by prompt
    assert metrics["reference"] == str(recipe.stage_dir("sft")) and metrics["pairs"] == "all"
    assert "eval_rewards/accuracies" in metrics and metrics["memory/predicted_gb"] > 0
    # the policy starts as an exact copy of the reference: the first loss is -log sigmoid(0) = ln 2
    assert metrics["first_logged_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert '"rewards/margins"' in (out / "train.log").read_text()


def test_base_and_reference_stay_bit_identical_and_the_policy_moved(dpo_run):
    recipe, out, shared, base_before = dpo_run
    after = base_weights(shared.model)
    after = {n: t for n, t in after.items() if "modules_to_save" not in n}
    assert after.keys() == base_before.keys()
    for name, tensor in base_before.items():
        assert torch.equal(tensor, after[name]), name
    sft = load_file(str(recipe.stage_dir("sft") / "adapter_model.safetensors"))
    reference = {n.replace(f".{REFERENCE}.", "."): p for n, p in shared.model.named_parameters()
                 if f".{REFERENCE}." in n}
    assert sft.keys() == reference.keys()
    for name, tensor in sft.items():
        assert torch.equal(tensor, reference[name].detach()), name
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert trained.keys() == sft.keys()
    assert all(not torch.equal(trained[k], sft[k]) for k in sft if "lora_B" in k)


def test_resume_after_a_kill_gives_the_adapter_of_an_uninterrupted_run(dpo_run, tmp_path, monkeypatch):
    from trl import DPOTrainer

    recipe, out, _, _ = dpo_run
    straight = load_file(str(out / "adapter_model.safetensors"))
    interrupted = recipe_from_dict({**yaml.safe_load((out / "recipe.yaml").read_text()),
                                    "output_dir": str(tmp_path / "run")})
    shutil.copytree(recipe.stage_dir("sft"), interrupted.stage_dir("sft"))
    original = DPOTrainer.training_step

    def killed_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:  # checkpoint-2 is on disk
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(DPOTrainer, "training_step", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train_dpo(interrupted)
    dpo_dir = interrupted.stage_dir("dpo")
    assert (dpo_dir / "checkpoints" / "checkpoint-2").is_dir() and not (dpo_dir / META_FILE).exists()
    resumed, _ = train_dpo(interrupted, resume=True)
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["global_step"] == 4
    again = load_file(str(resumed / "adapter_model.safetensors"))
    assert again.keys() == straight.keys()
    for key, tensor in straight.items():
        torch.testing.assert_close(again[key], tensor, rtol=0, atol=1e-7, msg=key)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case, error, message", [
    ("chosen equals rejected", DataError, "in every one of its 2 pairs the chosen response is the same text"),
    ("empty file", DataError, "DPO dataset '.*' is empty"),
    ("no data", DataError, "neither data.dpo nor data.reward"),
    ("named SFT adapter is missing", ModelError, "adapter folder '.*no-such-sft' does not exist"),
    ("every pair is too long", DataError, "all 24 training comparisons are longer than dpo.max_length=8"),
])
def test_bad_input_is_refused_before_anything_is_written(tiny_recipe, tmp_path, case, error, message):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "again", "rejected": "again"}]
    recipe = make_recipe(tiny_recipe, tmp_path, rows=rows if case == "chosen equals rejected" else None, sft=False)
    if case == "empty file":
        (tmp_path / "empty.jsonl").write_text("")
        recipe.data.dpo = type(recipe.data.reward)(path=str(tmp_path / "empty.jsonl"))
    elif case == "no data":
        recipe.data.reward = None
    elif case == "named SFT adapter is missing":
        recipe.dpo.sft_adapter = str(tmp_path / "no-such-sft")
    elif case == "every pair is too long":
        recipe.trainer_args["dpo"]["max_length"] = 8
    with pytest.raises(error, match=message):
        train_dpo(recipe)
    assert not (tmp_path / "run").exists()


def test_an_sft_adapter_of_another_base_is_refused(tiny_recipe, tmp_path, other_tiny_model_dir):
    recipe = make_recipe(tiny_recipe, tmp_path, sft=False)
    other = recipe_from_dict(tiny_recipe(model={"name": str(other_tiny_model_dir), "device": "cpu"}))
    save_sft_adapter(other, tmp_path / "other-sft")
    recipe.dpo.sft_adapter = str(tmp_path / "other-sft")
    with pytest.raises(ModelError, match="fingerprint .* but the loaded base"):
        train_dpo(recipe)
    assert not recipe.stage_dir("dpo").exists()


def test_cli_trains_and_reports_and_bad_input_exits_2(tiny_recipe, tmp_path):
    runner = CliRunner()
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Say yes.", "chosen": "yes", "rejected": "no"}] * 4)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(data={"dpo": {"path": str(data)}}, dpo={**FAST, "max_steps": 1})))
    result = runner.invoke(app, ["dpo", str(path), "--set", "dpo.beta=0.2"])
    assert result.exit_code == 0, result.output
    assert "DPO adapter written to" in result.output and "reference base" in result.output
    assert yaml.safe_load((tmp_path / "run" / "dpo" / "recipe.yaml").read_text())["dpo"]["beta"] == 0.2
    result = runner.invoke(app, ["dpo", str(path), "--set", "dpo.loss_type=ipoo"])
    assert result.exit_code == 2 and "unknown loss 'ipoo'" in result.output


def test_cli_learns_from_compares_rankings_as_the_pipeline_does(tiny_recipe, tmp_path):
    # The README's `lora-rlhf dpo RECIPE` after compare: no data.dpo or data.reward in the recipe, so the command
    # takes OUT/compare/rankings.jsonl with the pipeline's held-out fraction, as `pipeline` would.
    (tmp_path / "run" / "compare").mkdir(parents=True)
    write_jsonl(tmp_path / "run" / "compare" / "rankings.jsonl", banana_rankings(8))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(dpo={**FAST, "max_steps": 1},
                                               pipeline={"stages": ["compare", "dpo"], "reward_eval_fraction": 0.25})))
    result = CliRunner().invoke(app, ["dpo", str(path)])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "dpo" / "recipe.yaml").read_text())["data"]["reward"]
    assert saved["path"].endswith("compare/rankings.jsonl") and saved["eval_fraction"] == 0.25
    assert "over 8 pairs" in result.output  # the held-out quarter: 2 of 8 prompts, 4 pairs each
