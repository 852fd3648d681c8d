"""Step 2 on the tiny model: the RM learns a separable preference, its adapter reproduces the trained scores on
the causal shared base (4-bit and unquantized), the offset centres the demonstrations, bad input is refused."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import answer, banana_rankings, demos, randomize_adapter, recipe_dict, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_rlhf.core.adapters import META_FILE
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.heads import gather_last
from lora_rlhf.core.loading import load_tokenizer
from lora_rlhf.core.scoring import score_texts
from lora_rlhf.core.text import batches, encode
from lora_rlhf.errors import DataError, ModelError
from lora_rlhf.recipe.config import DatasetConfig, recipe_from_dict
from lora_rlhf.stages.reward import (
    _grouped_trainer_class,
    accuracy_interval,
    init_adapter_for,
    load_seqcls_model,
    reward_training_args,
    run_reward,
    seqcls_scores,
    tokenize_comparisons,
)

FAST = {"eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, "report_to": "none"}


def make_recipe(tiny_recipe, tmp_path, quantization="none", rows=None, **reward):
    """`tiny_recipe` is the fixture, or a recipe_dict on the CPU for a module's fixture."""
    write_jsonl(tmp_path / "rank.jsonl", rows if rows is not None else banana_rankings(16))
    write_jsonl(tmp_path / "demos.jsonl", demos())
    raw = tiny_recipe(quantization, data={"reward": {"path": str(tmp_path / "rank.jsonl"), "eval_fraction": 0.25},
                                          "sft": {"path": str(tmp_path / "demos.jsonl")}},
                      reward={**FAST, **reward})
    return recipe_from_dict(raw)


def cpu_recipe(model_dir, tmp):
    return lambda quantization, **sections: recipe_dict(model_dir, tmp / "run", quantization, cpu=True, **sections)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One unquantized reward run on the banana preference (12 train / 4 held-out prompts)."""
    tmp = tmp_path_factory.mktemp("reward")
    recipe = make_recipe(cpu_recipe(tiny_model_dir, tmp), tmp, "none", num_train_epochs=2, learning_rate=3e-3,
                         per_device_train_batch_size=8)
    return recipe, run_reward(recipe)


@pytest.fixture(scope="module")
def trained_4bit(tiny_model_dir, tmp_path_factory):
    """A few 4-bit steps: enough to move every LoRA weight away from its init."""
    tmp = tmp_path_factory.mktemp("reward4")
    recipe = make_recipe(cpu_recipe(tiny_model_dir, tmp), tmp, "4bit", rows=banana_rankings(4), max_steps=2,
                         learning_rate=1e-2)
    return recipe, run_reward(recipe)


def test_rm_learns_a_separable_preference(trained):
    _, out = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_pairs"] == 16  # 4 held-out prompts x 4 pairs, split by prompt
    assert metrics["train_pairs"] == 48
    assert metrics["eval_pairwise_accuracy"] >= 0.9
    assert metrics["eval_prompts"] == 4
    assert metrics["eval_pairwise_accuracy_low"] <= metrics["eval_pairwise_accuracy"]
    assert metrics["eval_pairwise_accuracy"] <= metrics["eval_pairwise_accuracy_high"]
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    assert metrics["at_chance"] is False and "AT CHANCE" not in (out / "train.log").read_text()
    # Every held-out pair is written with both scores; accuracy and loss are what those scores say.
    pairs = [json.loads(line) for line in (out / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and all(p["correct"] == (p["chosen_score"] > p["rejected_score"]) for p in pairs)
    assert all("banana" in p["chosen"] and "banana" not in p["rejected"] for p in pairs)
    assert metrics["eval_pairwise_accuracy"] == sum(p["correct"] for p in pairs) / 16
    loss = torch.nn.functional.softplus(torch.tensor([p["rejected_score"] - p["chosen_score"] for p in pairs]))
    assert metrics["eval_pairwise_loss"] == pytest.approx(float(loss.mean()), abs=1e-5)
    assert metrics["eval_pairwise_loss"] < 0.5


def test_held_out_pairs_from_their_own_file(tiny_recipe, tmp_path):
    """data.reward_eval holds out a file of its own: all of data.reward trains, and only the Trainer's per-epoch
    evaluation is skipped unless the recipe asks for it (the held-out pass after training scores the same pairs)."""
    write_jsonl(tmp_path / "held.jsonl", banana_rankings(3, seed=5))
    recipe = make_recipe(tiny_recipe, tmp_path, rows=banana_rankings(4), max_steps=1, normalize=False,
                         save_strategy="no", logging_steps=1)
    recipe.data.reward.eval_fraction = 0.0
    recipe.data.reward_eval = DatasetConfig(path=str(tmp_path / "held.jsonl"))
    del recipe.trainer_args["reward"]["eval_strategy"]
    metrics = json.loads((run_reward(recipe) / "metrics.json").read_text())
    assert metrics["train_pairs"] == 16 and (metrics["eval_pairs"], metrics["eval_prompts"]) == (12, 3)
    assert "eval_loss" not in metrics and "eval_pairwise_loss" in metrics  # no Trainer evaluation
    recipe.data.reward.eval_fraction = 0.25
    with pytest.raises(DataError, match="holds out reward data twice"):
        run_reward(recipe)


def test_the_head_learns_at_its_own_rate(tiny_recipe, tmp_path):
    """reward.head_learning_rate: the scalar head gets its own rate. With the LoRA's rate at 0, one step moves
    the head and nothing else; without a head rate, the head stays too."""
    from lora_rlhf.stages.reward import load_reward_data

    recipe = make_recipe(tiny_recipe, tmp_path, rows=banana_rankings(4), learning_rate=0.0)
    train, _ = load_reward_data(recipe.data.reward, recipe.seed)
    tokenizer = load_tokenizer(recipe.model.name)
    dataset, _ = tokenize_comparisons(train, tokenizer, None)
    moved = {}
    for head_lr in (None, 1e-2):
        torch.manual_seed(0)
        model, _ = load_seqcls_model(recipe, tokenizer, None)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        args = reward_training_args(recipe, tmp_path / f"o{head_lr}", False)
        args.max_steps = 1
        trainer = _grouped_trainer_class()(model=model, args=args, train_dataset=dataset,
                                           processing_class=tokenizer, head_learning_rate=head_lr)
        trainer.train()
        moved[head_lr] = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert moved[None] == set()
    assert moved[1e-2] and all(".score." in n for n in moved[1e-2])


def test_a_run_that_ends_at_chance_says_so_loudly(tiny_recipe, tmp_path, caplog):
    """Preferences that are coin flips train to a model that cannot tell chosen from rejected; the stage still
    marks it complete (it is a valid model), but says, in the log and on the console, that PPO would follow noise."""
    rng = random.Random(3)
    rows = [{"prompt": f"Tell me about item {i}.", "responses": [answer(rng, False) for _ in range(3)],
             "ranks": rng.sample([1, 2, 3], 3)} for i in range(8)]
    recipe = make_recipe(tiny_recipe, tmp_path, rows=rows, max_steps=2, normalize=False)
    out = run_reward(recipe)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_pairwise_accuracy_low"] <= 0.5 and metrics["at_chance"] is True
    assert "THE REWARD MODEL IS AT CHANCE: held-out pairwise accuracy" in caplog.text
    assert "THE REWARD MODEL IS AT CHANCE" in (out / "train.log").read_text()


def test_without_held_out_pairs_a_loss_at_ln2_is_chance():
    import logging
    import math

    from lora_rlhf.stages.reward import warn_if_at_chance

    quiet = logging.getLogger("test-chance")
    for loss, expected in ((math.log(2), True), (0.71, True), (0.4, False)):
        metrics = {"last_logged_loss": loss, "train_loss": 0.1}
        warn_if_at_chance(metrics, quiet)
        assert metrics["at_chance"] is expected, loss


def test_accuracy_interval_resamples_prompts_not_pairs():
    # 4 prompts of 6 pairs: two prompts all right, two all wrong. Pairs within a prompt move together, so the
    # interval must span what drawing 4 prompts can give (0.0 .. 1.0 in steps of 0.25), far wider than 24
    # independent pairs at 50 % would (about [0.3, 0.7]).
    wins = [True] * 12 + [False] * 12
    groups = [g for g in range(4) for _ in range(6)]
    accuracy, low, high = accuracy_interval(wins, groups)
    assert accuracy == 0.5
    assert low <= 0.25 and high >= 0.75
    # One prompt, all right: no spread at all.
    assert accuracy_interval([True, True], [3, 3]) == (1.0, 1.0, 1.0)
    # Independent prompts (one pair each) at 60 of 100 right: the usual binomial width, about +-0.1.
    accuracy, low, high = accuracy_interval([i < 60 for i in range(100)], list(range(100)))
    assert accuracy == 0.6 and 0.47 < low < 0.53 and 0.67 < high < 0.73
    with pytest.raises(ValueError):
        accuracy_interval([], [])


def test_output_folder_is_an_adapter_for_the_causal_base(trained):
    _, out = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "tokenizer.json",
                 "recipe.yaml", "metrics.json", "train.log", META_FILE):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert keys and all("lora_" in k for k in keys)  # the seq-cls `score` copy was dropped
    head = load_file(str(out / "head.safetensors"))
    assert head["weight"].shape == (1, 64) and head["bias"].shape == (1,)
    meta = json.loads((out / META_FILE).read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert (meta["stage"], meta["role"], meta["quantization"]) == ("reward", "reward", "none")
    assert meta["head"] == {"file": "head.safetensors", "hidden_size": 64}
    assert meta["reward_offset"] == pytest.approx(metrics["reward_offset"])
    assert meta["base"]["fingerprint"]


def _causal_and_seqcls_scores(recipe, out):
    """The same texts scored (a) on the causal shared base via SharedBase.scalar + gather_last, (b) by a
    sequence classifier built from the saved folder (LoRA + head loaded into `score`)."""
    rows = banana_rankings(3, seed=7)
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [x for r in rows for x in r["responses"]]
    shared = SharedBase.load(recipe.model, recipe.quantization, for_training=False)
    shared.load_adapter("reward", out)
    seqs = [encode(shared.tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    causal = torch.empty(len(seqs))
    with torch.no_grad():
        for idx, ids, mask in batches(seqs, 5, shared.tokenizer.pad_token_id, "cpu"):
            causal[idx] = gather_last(shared.scalar("reward", ids, mask), mask)
    via_api = score_texts(shared, prompts, responses, apply_offset=False)
    tokenizer = load_tokenizer(recipe.model)
    model, _ = load_seqcls_model(recipe, tokenizer, out)
    return causal, via_api, seqcls_scores(model, tokenizer, prompts, responses), model


@pytest.mark.parametrize("which", ["trained", "trained_4bit"])
def test_reward_adapter_on_causal_base_matches_the_seqcls_model(which, request):
    recipe, out = request.getfixturevalue(which)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reload_max_abs_diff"] < 1e-4  # the run's own check: in-memory trained model vs reload
    causal, via_api, seqcls, model = _causal_and_seqcls_scores(recipe, out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained: the LoRA really contributes
    assert seqcls.std() > 1e-3  # scores are not constant, so equality below is informative
    torch.testing.assert_close(causal, seqcls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(via_api.cpu(), causal, atol=1e-5, rtol=1e-5)


def test_offset_makes_the_demonstrations_score_zero_on_average(trained):
    recipe, out = trained
    meta = json.loads((out / META_FILE).read_text())
    assert abs(meta["reward_offset"]) > 1e-3  # a real shift, not the default
    shared = SharedBase.load(recipe.model, recipe.quantization, for_training=False)
    shared.load_adapter("reward", out)
    rows = demos()
    prompts, responses = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    centred = score_texts(shared, prompts, responses)
    raw = score_texts(shared, prompts, responses, apply_offset=False)
    assert abs(float(centred.mean())) < 1e-4
    assert float(raw.mean()) == pytest.approx(meta["reward_offset"], abs=1e-4)
    torch.testing.assert_close(raw - centred, torch.full_like(raw, meta["reward_offset"]))


def test_resume_continues_from_the_last_checkpoint_and_normalize_false(tiny_recipe, tmp_path):
    recipe = make_recipe(tiny_recipe, tmp_path, rows=banana_rankings(4), max_steps=1, normalize=False,
                         save_strategy="steps", save_steps=1, per_device_train_batch_size=4)
    out = run_reward(recipe)
    assert json.loads((out / META_FILE).read_text())["reward_offset"] == 0.0  # normalize: false
    assert (out / "checkpoints" / "checkpoint-1").is_dir()
    recipe.trainer_args["reward"]["max_steps"] = 2
    metrics = json.loads((run_reward(recipe, resume=True) / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-1") and metrics["global_step"] == 2
    assert "resume from" in (out / "train.log").read_text()


def test_grouped_batches_hold_all_pairs_of_a_prompt(tiny_recipe, tmp_path):
    rows = [{"prompt": f"Q{i}", "responses": ["a", "b", "c"], "ranks": [1, 2, 3]} for i in range(8)]  # 3 pairs each
    recipe = make_recipe(tiny_recipe, tmp_path, rows=rows, per_device_train_batch_size=4)
    from lora_rlhf.stages.reward import load_reward_data

    train, _ = load_reward_data(recipe.data.reward, recipe.seed)
    tokenizer = load_tokenizer(recipe.model.name)
    model, _ = load_seqcls_model(recipe, tokenizer, None)
    dataset, _ = tokenize_comparisons(train, tokenizer, None)

    def prompts_per_batch(group_by_prompt: bool) -> list[list[str]]:
        trainer = _grouped_trainer_class()(
            model=model, args=reward_training_args(recipe, tmp_path / "o", False), train_dataset=dataset,
            processing_class=tokenizer, group_by_prompt=group_by_prompt)
        out = []
        for batch in trainer.get_train_dataloader():
            chosen = batch["input_ids"][: len(batch["input_ids"]) // 2]  # the collator puts chosen first
            out.append([t.split("user\n")[1].split("<|im_end|>")[0] for t in tokenizer.batch_decode(chosen)])
        return out

    grouped = prompts_per_batch(True)
    assert sum(len(b) for b in grouped) == len(dataset) == 18
    for batch in grouped:  # each prompt present in a batch with all 3 of its pairs
        assert all(batch.count(p) == 3 for p in batch)
    plain = prompts_per_batch(False)  # TRL's default random batches of 4 split prompts
    assert any(batch.count(p) != 3 for batch in plain for p in batch)


def test_each_distinct_response_is_scored_once_with_the_same_loss_and_gradients(tiny_recipe, tmp_path):
    """With 3 responses per prompt and all 3 pairs in one batch, each response appears twice among the 6 rows
    of a prompt's pairs: the grouped trainer forwards each distinct row once (the paper's one pass per
    completion) and gets TRL's loss and gradients exactly."""
    from trl import RewardTrainer

    rows = [{"prompt": f"Q{i}", "responses": ["a", "b b", "c c c"], "ranks": [1, 2, 3]} for i in range(4)]
    recipe = make_recipe(tiny_recipe, tmp_path, rows=rows, per_device_train_batch_size=6)
    from lora_rlhf.stages.reward import load_reward_data

    train, _ = load_reward_data(recipe.data.reward, recipe.seed)
    tokenizer = load_tokenizer(recipe.model.name)
    model, _ = load_seqcls_model(recipe, tokenizer, None)
    dataset, _ = tokenize_comparisons(train, tokenizer, None)
    trainer = _grouped_trainer_class()(model=model, args=reward_training_args(recipe, tmp_path / "o", False),
                                       train_dataset=dataset, processing_class=tokenizer, group_by_prompt=True)
    batch = next(iter(trainer.get_train_dataloader()))
    rows = len(batch["input_ids"])  # whole prompts: 3 pairs each, chosen + rejected
    assert rows >= 6 and rows % 6 == 0
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(len(kw["input_ids"])), with_kwargs=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        results = {}
        for name, compute in (("trl", lambda: RewardTrainer.compute_loss(trainer, model, dict(batch))),
                              ("once", lambda: trainer.compute_loss(model, dict(batch)))):
            model.zero_grad()
            loss = compute()
            loss.backward()
            results[name] = (loss.detach(), [p.grad.clone() for p in trainable])
    finally:
        hook.remove()
    assert seen == [rows, rows // 2]  # 3 distinct responses per prompt
    torch.testing.assert_close(results["once"][0], results["trl"][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results["once"][1], results["trl"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in results["once"][1])


def test_init_from_the_sft_adapter(tiny_recipe, tmp_path):
    recipe = make_recipe(tiny_recipe, tmp_path)
    assert init_adapter_for(recipe) is None  # no OUT/sft yet: a fresh LoRA
    sft = recipe.stage_dir("sft")
    shared = SharedBase.load(recipe.model, recipe.quantization)
    shared.add_adapter("default", recipe.lora)
    randomize_adapter(shared, "default", std=1.0)
    shared.save_adapter("default", sft, stage="sft")
    folder = init_adapter_for(recipe)
    assert folder == sft
    model, _ = load_seqcls_model(recipe, load_tokenizer(recipe.model.name), folder)
    saved = load_file(str(sft / "adapter_model.safetensors"))
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(got) == len(saved)
    for key, value in saved.items():  # every SFT LoRA weight is where the reward LoRA starts
        name = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(got[name], value)
        assert got[name].requires_grad


def test_adapter_from_another_base_is_refused(tiny_recipe, tmp_path, other_tiny_model_dir, trained):
    _, out = trained
    recipe = make_recipe(tiny_recipe, tmp_path)
    recipe.model.name = str(other_tiny_model_dir)
    recipe.reward.init_adapter = str(out)
    with pytest.raises(ModelError, match="fingerprint .* but the loaded base"):
        run_reward(recipe)
    assert not recipe.stage_dir("reward").exists()


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "responses": ["only one"], "ranks": [1]}], "at least two"),
    ([{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 1, 1]}], "all 3 responses are tied"),
    ([{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]}, {"prompt": "q", "responses": ["a", "b"]}],
     "exactly one of 'ranks'"),
    ([{"chosen": "a b", "other": 1}], "needs rankings"),
    ([{"prompt": "p", "chosen": "a"}], "needs rankings"),
])
def test_bad_reward_data_is_refused_before_anything_is_written(tiny_recipe, tmp_path, rows, message):
    recipe = make_recipe(tiny_recipe, tmp_path, rows=rows)
    with pytest.raises(DataError, match=message):
        run_reward(recipe)
    assert not recipe.stage_dir("reward").exists()


def test_cli_exit_codes(tiny_recipe, tmp_path):
    import yaml

    from lora_rlhf_cli.main import app

    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranks": [2, 2]}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("none", data={"reward": {"path": str(tmp_path / "bad.jsonl")}})))
    result = CliRunner().invoke(app, ["reward", str(recipe)])
    assert result.exit_code == 2
    assert "all 2 responses are tied" in result.output
    result = CliRunner().invoke(app, ["reward", str(recipe), "--set", "reward.no_such_key=1"])
    assert result.exit_code == 2 and "unknown key 'reward.no_such_key'" in result.output


def test_a_full_disk_while_saving_exits_2_and_leaves_the_stage_unfinished(tiny_recipe, tmp_path, monkeypatch):
    import errno

    import yaml

    from lora_rlhf.core.adapters import is_finished
    from lora_rlhf.stages import reward as reward_module
    from lora_rlhf_cli.main import app

    recipe = make_recipe(tiny_recipe, tmp_path, rows=banana_rankings(4), max_steps=1, normalize=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": recipe.output_dir, "model": {"name": recipe.model.name},
                                    "quantization": {"mode": "none"}, "data": {"reward": {"path": recipe.data.reward.path}},
                                    "reward": {**FAST, "max_steps": 1, "normalize": False}}))

    def disk_full(model, tokenizer, out):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "adapter_model.safetensors"))

    monkeypatch.setattr(reward_module, "save_reward_adapter", disk_full)
    result = CliRunner().invoke(app, ["reward", str(path)])
    out = recipe.stage_dir("reward")
    assert result.exit_code == 2, result.output
    assert f"no space left on the device while writing {out}" in result.output
    assert "nothing was marked complete" in result.output and "Traceback" not in result.output
    assert not is_finished(out, "reward") and not (out / META_FILE).exists()


def test_a_new_head_starts_at_zero_when_asked_and_a_continued_one_keeps_its_weights(tiny_recipe, tmp_path, trained):
    from lora_rlhf.stages.reward import _score_layer

    _, reward_out = trained
    tokenizer = load_tokenizer(tiny_recipe()["model"]["name"])
    for head_init in ("normal", "zeros"):
        recipe = make_recipe(tiny_recipe, tmp_path, head_init=head_init)
        model, _ = load_seqcls_model(recipe, tokenizer, None)
        weight = _score_layer(model).weight
        assert (weight.abs().sum() == 0) == (head_init == "zeros"), head_init
        # continuing a reward adapter: its own head, whatever head_init says
        model, _ = load_seqcls_model(recipe, tokenizer, reward_out)
        saved = load_file(str(reward_out / "head.safetensors"))["weight"]
        torch.testing.assert_close(_score_layer(model).weight.detach(), saved.reshape(1, -1))
