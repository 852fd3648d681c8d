"""PPO on one shared 4-bit base: what trains, what stays frozen, alignment of every per-token quantity,
learning, exact resume, one copy of the base, and failure modes. Tiny Llama on the CPU (or, device-switched, on a
GPU: tests/helpers.py)."""

from __future__ import annotations

import collections
import gc
import json
from pathlib import Path

import pytest
import torch
from helpers import (
    FAST_PPO,
    PROMPTS,
    REWARD_MODULE,
    REWARD_OFFSET,
    TEST_DEVICE,
    TEST_MODEL,
    trainer_with_adapters,
)

from lora_rlhf.core import text
from lora_rlhf.core.base import SharedBase, _adapter_of
from lora_rlhf.recipe.config import recipe_from_dict
from lora_rlhf.stages.ppo import rollout
from lora_rlhf.stages.ppo.checkpoint import STATE_FILE
from lora_rlhf.stages.ppo.ptx import IGNORE, tokenize_row
from lora_rlhf.stages.ppo.roles import resolve_sources
from lora_rlhf.stages.ppo.trainer import NonFiniteError, build_trainer, train_ppo


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_MODULE)
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def snapshot(sb: SharedBase) -> dict[str, torch.Tensor]:
    """Every tensor of the model (4-bit weights and their quantization state included) and of the heads."""
    state = {k: v.detach().clone() for k, v in sb.model.state_dict().items()}
    for role, head in sb.heads.items():
        state.update({f"head.{role}.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    return state


def owner(name: str) -> str:
    """The role a tensor belongs to ('base' for the shared weights)."""
    if name.startswith("head."):
        return name.split(".")[1]
    return _adapter_of(name) or "base"


def base_weight_census() -> tuple[set[int], set[int]]:
    """Storages of every 4-bit weight and every embedding matrix alive in the process."""
    import bitsandbytes as bnb

    gc.collect()
    objects = gc.get_objects()
    quantized = {o.data_ptr() for o in objects if isinstance(o, bnb.nn.Params4bit)}
    embeddings = {o.weight.data_ptr() for o in objects if isinstance(o, torch.nn.Embedding)}
    return quantized, embeddings


def test_one_step_trains_policy_value_and_head_on_one_copy_of_the_base(tiny_recipe, stage_adapters):
    import bitsandbytes as bnb

    quantized_before, embeddings_before = base_weight_census()
    trainer = trainer_with_adapters(tiny_recipe, stage_adapters)
    sb = trainer.sb
    assert set(sb.roles) == {"reference", "policy", "reward", "value"}  # one base, four roles
    before = snapshot(sb)
    assert any(v.dtype == torch.uint8 for k, v in before.items() if owner(k) == "base")  # really 4-bit
    trainer.step()
    after = snapshot(sb)

    by_role = collections.defaultdict(list)
    for name in before:
        by_role[owner(name)].append(torch.equal(before[name], after[name]))
    # policy and value LoRA (initialised non-zero from SFT / reward) and the value head: every tensor moved,
    # although the policy and the value passes of one step ran with different active adapters.
    for role in ("policy", "value"):
        assert not any(by_role[role]), f"some {role} tensors did not change"
    assert "value" in sb.heads and len(by_role["value"]) > 2
    # the base (uint8 NF4 weights, quantization constants, norms, embeddings), reference and reward: bit-identical
    for role in ("base", "reference", "reward"):
        assert by_role[role] and all(by_role[role]), f"{role} tensors changed"
    # and still frozen after the adapter switches of the step
    for name, p in sb.model.named_parameters():
        assert p.requires_grad == (_adapter_of(name) in ("policy", "value")), name

    # All four roles and a PPO step later, the process holds exactly one more set of 4-bit weights and one more
    # embedding matrix than before: one copy of the base.
    quantized_after, embeddings_after = base_weight_census()
    n_linear4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in sb.model.modules())
    assert n_linear4bit == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert len(quantized_after - quantized_before) == n_linear4bit
    assert len(embeddings_after - embeddings_before) == 1


def test_rollout_quantities_line_up_with_unpadded_forwards(tiny_recipe, stage_adapters):
    """Left-padded queries, right-padded responses: every per-token number equals a plain forward of that one
    sequence without padding, and the score is the reward head at its last token minus the offset."""
    trainer = trainer_with_adapters(tiny_recipe, stage_adapters, temperature=0.7)
    sb, cfg = trainer.sb, trainer.cfg
    trainer._train_mode(False)
    batch = rollout.score(trainer.sb, rollout.generate(trainer.sb, PROMPTS, cfg), trainer.reward, cfg)
    assert len(set(len(ids) for ids in [text.prompt_ids(sb.tokenizer, p) for p in PROMPTS])) > 1  # padding happened
    with torch.no_grad():
        for i in range(len(PROMPTS)):
            ids = batch.query_responses[i][batch.attention_mask[i].bool()].unsqueeze(0)
            n = int(batch.lengths[i])
            start = ids.shape[1] - n - 1  # logits at this position predict the first response token
            ones = torch.ones_like(ids)
            for role, field in (("policy", "logprobs"), ("reference", "ref_logprobs")):
                with sb.use(role) as model:
                    logits = model(input_ids=ids).logits[0, start:-1] / cfg.temperature
                expected = torch.log_softmax(logits, -1).gather(-1, ids[0, start + 1:, None])[:, 0]
                torch.testing.assert_close(getattr(batch, field)[i, :n], expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batch.values[i, :n], sb.scalar("value", ids, ones)[0, start:-1],
                                       atol=1e-4, rtol=1e-4)
            # A response cut before its stop token is scored with it appended, as the comparisons were (encode).
            read = ids if batch.ended[i] else torch.cat([ids, ids.new_tensor([[sb.tokenizer.eos_token_id]])], 1)
            expected_score = sb.scalar("reward", read, torch.ones_like(read))[0, -1] - REWARD_OFFSET
            torch.testing.assert_close(batch.scores[i], expected_score, atol=1e-4, rtol=1e-4)
            if not batch.ended[i]:
                unread = sb.scalar("reward", ids, ones)[0, -1] - REWARD_OFFSET
                assert (batch.scores[i] - unread).abs() > 1e-4  # the appended token changed what the head read
    assert not batch.ended.all()  # the tiny model's answers run to R tokens: the appended-stop path ran
    # nothing past a response's end counts
    assert (batch.logprobs * (1 - batch.response_mask)).abs().sum() == 0
    assert (batch.values * (1 - batch.response_mask)).abs().sum() == 0


def test_log_probs_one_sequence_at_a_time_equal_the_whole_batch_logits_with_their_gradients(tiny_recipe,
                                                                                            stage_adapters,
                                                                                            monkeypatch):
    """The policy's training log-probs run the LM head per sequence under checkpointing (no [B, R, V] logits):
    log-probs, entropy and the gradients they give the policy adapter equal the model's own forward's."""
    trainer = trainer_with_adapters(tiny_recipe, stage_adapters, temperature=0.7)
    sb, cfg = trainer.sb, trainer.cfg
    trainer._train_mode(False)
    torch.manual_seed(0)
    batch = rollout.score(sb, rollout.generate(sb, PROMPTS, cfg), trainer.reward, cfg)
    assert sb.lm_head() is not None  # a Llama: the per-sequence path runs

    def loss_and_grads(per_sequence: bool):
        if not per_sequence:
            monkeypatch.setattr(SharedBase, "lm_head", lambda self: None)  # the model's own forward
        try:
            with sb.use("policy"):
                logprobs, entropy = rollout.response_logprobs(sb, batch, cfg.temperature, with_entropy=True)
                (logprobs * torch.linspace(-1, 1, logprobs.numel(), device=logprobs.device).view_as(logprobs)).sum().backward()
        finally:
            monkeypatch.undo()
        grads = [p.grad.clone() for p in sb.trainable_parameters("policy")]
        for p in sb.trainable_parameters("policy"):
            p.grad = None
        return logprobs.detach(), entropy, grads

    mine, whole = loss_and_grads(True), loss_and_grads(False)
    torch.testing.assert_close(mine[0], whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine[1], whole[1], atol=1e-5, rtol=1e-5)
    assert mine[1].requires_grad is False and (mine[1][batch.response_mask.bool()] > 0).all()
    assert any(g.abs().sum() > 0 for g in mine[2])
    for a, b in zip(mine[2], whole[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # float sums in another order
    with sb.use("policy"), torch.no_grad():
        logits = rollout.response_logits(sb.model, batch) / cfg.temperature
    logp = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(mine[1], -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5)

def test_stop_token_ends_responses_and_masks_come_from_lengths(tiny_recipe, stage_adapters):
    trainer = trainer_with_adapters(tiny_recipe, stage_adapters)
    sb = trainer.sb
    eos = sb.tokenizer.eos_token_id
    bias = torch.zeros(sb.model.config.vocab_size, device=sb.device)
    bias[eos] = 1e4  # the model now always says end-of-turn
    hook = sb.model.get_output_embeddings().register_forward_hook(lambda module, inputs, out: out + bias)
    try:
        batch = rollout.generate(trainer.sb, PROMPTS, trainer.cfg)
        assert batch.lengths.tolist() == [1] * 4 and batch.ended.all()
        assert batch.responses[:, 0].tolist() == [eos] * 4
        trainer.cfg.stop_token = None  # no stop token: every generated token is real, end-of-turn included
        batch = rollout.generate(trainer.sb, PROMPTS, trainer.cfg)
    finally:
        hook.remove()
    assert batch.lengths.tolist() == [trainer.cfg.response_length] * 4 and not batch.ended.any()
    assert (batch.responses == eos).all() and batch.response_mask.all()


def test_nan_reward_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tiny_recipe, reward_file, prompts_file,
                                                                           monkeypatch):
    monkeypatch.setenv("PPO_TEST_NAN_AT", "2")
    recipe = recipe_from_dict(tiny_recipe(data={"prompts": {"path": str(prompts_file)}},
                                          ppo={**FAST_PPO, "total_episodes": 12, "reward_fn": f"{reward_file}:count_e"}))
    with pytest.raises(NonFiniteError, match="reward scores became NaN or infinite at PPO step 2"):
        train_ppo(recipe, progress=False)
    out = recipe.stage_dir("ppo")
    state = json.loads((out / "checkpoint" / STATE_FILE).read_text())
    assert state["step"] == 1  # the good step-1 checkpoint is intact
    assert not (out / "policy" / "lora_rlhf.json").exists()  # no "finished" output


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_recipe, reward_file, prompts_file, monkeypatch,
                                                            tmp_path):
    def recipe_in(folder: str):
        return recipe_from_dict(tiny_recipe(output_dir=str(tmp_path / folder), data={"prompts": {"path": str(prompts_file)}},
                                            ppo={**FAST_PPO, "total_episodes": 12, "save_steps": 10,
                                                 "reward_fn": f"{reward_file}:count_e"}))

    straight = recipe_in("straight")
    train_ppo(straight, progress=False)
    expected = [json.loads(line) for line in (straight.stage_dir("ppo") / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in expected] == [1, 2, 3]

    interrupted = recipe_in("interrupted")
    monkeypatch.setenv("PPO_TEST_INTERRUPT_AT", "2")  # Ctrl-C during step 2: finish it, checkpoint, stop
    with pytest.raises(KeyboardInterrupt):
        train_ppo(interrupted, progress=False)
    out = interrupted.stage_dir("ppo")
    assert json.loads((out / "checkpoint" / STATE_FILE).read_text())["step"] == 2
    assert not (out / "policy" / "lora_rlhf.json").exists()
    monkeypatch.delenv("PPO_TEST_INTERRUPT_AT")
    train_ppo(interrupted, resume=True, progress=False)
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("objective/scores", "objective/kl", "objective/entropy", "loss/policy", "loss/value",
                "policy/approxkl", "kl_coef", "lr"):
        assert resumed[2][key] == pytest.approx(expected[2][key], rel=1e-5, abs=1e-6), key
    assert (out / "policy" / "lora_rlhf.json").is_file()


def test_ptx_rows_target_only_the_completion(tiny_model_dir):
    from lora_rlhf.core.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    ids, labels = tokenize_row(tok, {"text": "plain pretraining text"}, 64)
    assert labels == ids  # every token is a target
    ids, labels = tokenize_row(tok, {"prompt": "Question:", "completion": " answer"}, 64)
    n_prompt = len(tok("Question:")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    ids, labels = tokenize_row(tok, {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello"}, 512)
    assert tok.decode([t for t in labels if t != IGNORE]).startswith("Hello")
    assert len(tokenize_row(tok, {"text": "word " * 100}, 16)[0]) == 16


def test_build_trainer_without_a_preflight_plans_ppo_ptx_when_given_ptx_rows(tiny_recipe, stage_adapters,
                                                                             monkeypatch):
    """Callers that pass no `memory` (the benches) get the preflight of what they run: PPO-ptx at the longest ptx
    row when ptx rows are given, plain PPO otherwise."""
    from helpers import Stop

    from lora_rlhf.core.loading import load_tokenizer
    from lora_rlhf.stages.ppo import trainer as ppo_trainer
    from lora_rlhf.stages.ppo.ptx import PtxData

    sft, reward = stage_adapters
    recipe = recipe_from_dict(tiny_recipe(ppo={**FAST_PPO, "sft_adapter": str(sft), "reward_adapter": str(reward)}))
    rows = [{"text": "short"}, {"text": "a longer general text " * 5}]
    ptx = PtxData.build(rows, load_tokenizer(recipe.model), 64, seed=0)
    seen = []

    def planned(recipe, stage, sequence_length=None, prompt_length=None):
        seen.append((stage, sequence_length))
        raise Stop

    monkeypatch.setattr(ppo_trainer, "check_memory", planned)
    for rows_given in (ptx, None):
        with pytest.raises(Stop):
            build_trainer(recipe, resolve_sources(recipe), PROMPTS, rows_given)
    assert seen == [("ppo-ptx", ptx.longest), ("ppo", None)] and ptx.longest > 10


def build_banana_model(folder: Path, p_target: float = 0.1) -> Path:
    """A tiny model with a reward the policy can learn in a few dozen steps.

    A random tiny model's next-token distribution is nearly uniform over 49k tokens and has no feature shared by
    all contexts, so no LoRA update makes one token likelier everywhere. Here biases give the final hidden states
    a shared direction, and the lm_head row of " banana" points along it, tuned so that p(banana) is ~10 %.
    """
    from helpers import build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_tiny_model(folder.with_name(folder.name + "-src"), tie_word_embeddings=False, mlp_bias=True,
                           attention_bias=True)
    model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    target = tok.encode(" banana", add_special_tokens=False)[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        hidden = model.model(torch.randint(100, 40000, (32, 24), generator=g)).last_hidden_state.flatten(0, 1)
        direction = (hidden / hidden.norm(dim=-1, keepdim=True)).mean(0)
        lo, hi = 0.0, 50.0
        for _ in range(30):  # bisect the row's length until p(banana) averages p_target
            scale = (lo + hi) / 2
            model.lm_head.weight[target] = scale * direction / direction.norm()
            p = model.lm_head(hidden).softmax(-1)[:, target].mean().item()
            lo, hi = (scale, hi) if p < p_target else (lo, scale)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("estimator", [
    {},                                                          # the paper's GAE with a value adapter
    {"advantage_estimator": "rloo", "num_generations": 4},       # value-free: leave-one-out baseline
    {"advantage_estimator": "grpo", "num_generations": 4},       # value-free: group-normalised
], ids=["gae", "rloo", "grpo"])
def test_ppo_raises_a_programmatic_reward_with_bounded_kl(tiny_recipe, tmp_path, estimator):
    """Reward: +1 per " banana" in the response. Within 20 PPO steps the policy says it far more often, while the
    KL penalty keeps it close to the reference; the value-free estimators learn without any value role."""
    model_dir = build_banana_model(tmp_path / "banana-llama")
    (tmp_path / "banana.py").write_text("def reward(prompts, responses):\n"
                                        "    return [float(r.count('banana')) for r in responses]\n")
    recipe = recipe_from_dict(tiny_recipe(
        model={"name": str(model_dir), **TEST_MODEL},
        ppo={**FAST_PPO, "reward_fn": f"{tmp_path}/banana.py:reward", "total_episodes": 160, "batch_size": 8,
             "local_rollout_forward_batch_size": 8, "response_length": 8, "num_ppo_epochs": 2,
             "num_mini_batches": 2, "learning_rate": 1e-3, "kl_coef": 0.1, **estimator}))
    trainer = build_trainer(recipe, resolve_sources(recipe), PROMPTS)
    sb = trainer.sb
    assert sb.has("value") == (not estimator)  # rloo/grpo: no value adapter, head or optimizer state
    target = sb.tokenizer.encode(" banana", add_special_tokens=False)[0]

    def p_banana() -> float:  # exact, no sampling noise: p(" banana") as the first token of each answer
        q, mask = text.pad([text.prompt_ids(sb.tokenizer, p) for p in PROMPTS], sb.tokenizer.pad_token_id, "left", sb.device)
        with torch.no_grad(), sb.use("policy") as model:
            logits = model(input_ids=q, attention_mask=mask, position_ids=rollout.position_ids(mask)).logits[:, -1]
        return logits.softmax(-1)[:, target].mean().item()

    p_before = p_banana()
    history = [trainer.step()[0] for _ in range(trainer.num_steps)]
    scores = [m["objective/scores"] for m in history]
    kls = [m["objective/kl"] for m in history]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    print(f"scores {scores}\nkl {kls}")  # shown with -s / on failure: the margins of the assertions below
    assert last > 2 * first and last - first > 0.5, scores
    assert p_banana() > 2 * p_before
    assert max(kls[-5:]) < 10.0, kls  # nats per 8-token response: the penalty holds the policy near the reference


def test_first_step_starts_on_policy_ratio_one_and_kl_to_a_nonzero_reference_zero(tiny_recipe, stage_adapters,
                                                                                   monkeypatch):
    """Before any update the policy IS the SFT reference: the sampled tokens' log-probs under both agree (KL 0
    up to the rounding of a cached vs a full forward), and the first mini-batch's ratio is 1. The SFT adapter
    is non-zero, so this holds because policy = copy of reference, not because both are the bare base."""
    from lora_rlhf.stages.ppo import losses

    trainer = trainer_with_adapters(tiny_recipe, stage_adapters)
    sb, cfg = trainer.sb, trainer.cfg
    torch.manual_seed(0)
    sb.train(False)
    batch = rollout.score(sb, rollout.generate(sb, PROMPTS, cfg), trainer.reward, cfg)
    torch.testing.assert_close(batch.logprobs, batch.ref_logprobs, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), sb.use(None):
        bare = rollout.response_logprobs(sb, batch, cfg.temperature)[0]
    assert not torch.allclose(bare, batch.ref_logprobs, atol=1e-4)  # the reference is not the bare base

    first = []
    real = losses.policy_loss
    monkeypatch.setattr(losses, "policy_loss", lambda *a, **k: first.append(real(*a, **k)) or first[-1])
    metrics, _ = trainer.step()
    stats = first[0][1]
    assert stats["approxkl"].item() < 1e-8 and abs(stats["ratio"].item() - 1.0) < 1e-4
    assert abs(metrics["objective/kl"]) < 1e-3


def test_scoring_reuses_the_log_probs_of_generation_on_the_cpu_only(tiny_recipe, stage_adapters, monkeypatch):
    """On the CPU scoring runs the reference, value and reward adapters once per chunk and never the policy: its
    log-probs come from the logits generation computed (checked against plain forwards in the test above). On a
    GPU generation keeps no logits and scoring runs the policy too (rollout.keeps_generation_logprobs)."""
    trainer = trainer_with_adapters(tiny_recipe, stage_adapters)
    sb, cfg = trainer.sb, trainer.cfg
    sb.train(False)
    batch = rollout.generate(sb, PROMPTS, cfg)
    used = []
    real_use = sb.use
    monkeypatch.setattr(sb, "use", lambda role: used.append(role) or real_use(role))
    scored = rollout.score(sb, batch, trainer.reward, cfg)
    if TEST_DEVICE == "cpu":
        assert batch.logprobs is not None and (batch.logprobs * batch.response_mask).ne(0).any()
        assert sorted(used) == ["reference", "reward", "value"]
        assert scored.logprobs is batch.logprobs
    else:
        assert batch.logprobs is None
        assert sorted(used) == ["policy", "reference", "reward", "value"]


def test_a_gold_score_is_logged_beside_the_reward_and_never_trained_on(tiny_recipe, stage_adapters, reward_file):
    """ppo.gold_fn judges each step's rollouts (objective/gold) while the reward model drives the loss: the same
    seed with and without the monitor trains bit-identical adapters."""
    runs = {}
    for gold in (None, f"{reward_file}:count_e"):
        trainer = trainer_with_adapters(tiny_recipe, stage_adapters, **({"gold_fn": gold} if gold else {}))
        metrics, batch = trainer.step()
        runs[gold] = (metrics, snapshot(trainer.sb))
        if gold:
            assert metrics["objective/gold"] == pytest.approx(sum(t.count("e") for t in batch.texts) / len(batch.texts))
    assert "objective/gold" not in runs[None][0]
    assert runs[None][0]["objective/scores"] == runs[f"{reward_file}:count_e"][0]["objective/scores"]
    plain, monitored = runs[None][1], runs[f"{reward_file}:count_e"][1]
    assert plain.keys() == monitored.keys()
    for name in plain:
        assert torch.equal(plain[name], monitored[name]), name


def test_a_gold_function_that_cannot_be_loaded_stops_before_anything_is_written(tiny_recipe, stage_adapters,
                                                                                prompts_file):
    from lora_rlhf.errors import LoraRlhfError

    sft, reward = stage_adapters
    recipe = recipe_from_dict(tiny_recipe(data={"prompts": {"path": str(prompts_file)}},
                                          ppo={**FAST_PPO, "sft_adapter": str(sft), "reward_adapter": str(reward),
                                               "gold_fn": "no_such_module_xyz:gold"}))
    with pytest.raises(LoraRlhfError, match="ppo.gold_fn"):
        train_ppo(recipe, progress=False)
    assert not recipe.stage_dir("ppo").exists()


def test_the_value_role_copies_the_reward_adapter_with_its_head_or_with_a_zero_head(tiny_recipe, stage_adapters):
    """value_head_init: `reward` (the paper) copies the reward head; `zeros` keeps the reward LoRA and starts the head
    at 0, so the first values are 0 at every token instead of the reward model's score of a partial answer."""
    heads = {}
    for init in ("reward", "zeros"):
        sb = trainer_with_adapters(tiny_recipe, stage_adapters, value_head_init=init).sb
        reward, value = sb._params["reward"], sb._params["value"]
        assert len(reward) == len(value) and all(torch.equal(a, b) for a, b in zip(reward, value, strict=True))
        heads[init] = {k: v.clone() for k, v in sb.heads["value"].state_dict().items()}
        if init == "reward":
            for k, v in sb.heads["reward"].state_dict().items():
                assert torch.equal(heads[init][k], v), k
    assert heads["reward"]["linear.weight"].abs().sum() > 0
    assert all(v.abs().sum() == 0 for v in heads["zeros"].values())
