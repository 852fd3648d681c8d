"""PPO on one shared 4-bit base: what trains, what stays frozen, alignment of every per-token quantity,
learning, exact resume, one copy of the base, and failure modes. Tiny Llama on the CPU."""

from __future__ import annotations

import collections
import gc
import json
from pathlib import Path

import pytest
import torch

from lora_rlhf.base import SharedBase, _adapter_of
from lora_rlhf.config import LoraSettings, ModelConfig, QuantizationConfig, recipe_from_dict
from lora_rlhf.ppo import rollout
from lora_rlhf.ppo.checkpoint import STATE_FILE
from lora_rlhf.ppo.ptx import IGNORE, tokenize_row
from lora_rlhf.ppo.roles import resolve_sources
from lora_rlhf.ppo.trainer import NonFiniteError, build_trainer, train_ppo

PROMPTS = ["Say something.", "Tell me a story about a cat.", [{"role": "user", "content": "Hi!"}], "2+2?"]
REWARD_OFFSET = 0.25
# Small enough for seconds per step on two CPU cores.
FAST_PPO = {"total_episodes": 8, "batch_size": 4, "local_rollout_forward_batch_size": 4, "response_length": 6,
            "num_ppo_epochs": 1, "num_mini_batches": 2, "learning_rate": 1e-3, "temperature": 1.0,
            "save_steps": 1, "sample_every": 1}

# A reward function in a file, as a user would write it; env vars make it interrupt or fail on the N-th call.
REWARD_MODULE = '''
import os, signal
CALLS = 0

def count_e(prompts, responses):
    global CALLS
    CALLS += 1
    if os.environ.get("PPO_TEST_INTERRUPT_AT") == str(CALLS):
        os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during this step
    if os.environ.get("PPO_TEST_NAN_AT") == str(CALLS):
        return [float("nan")] * len(responses)
    return [float(r.count("e")) for r in responses]
'''


def make_adapters(model_dir: Path, out: Path) -> tuple[Path, Path]:
    """An SFT adapter and a reward adapter (+ head, offset) as steps 1 and 2 would leave them."""
    sb = SharedBase.load(ModelConfig(name=str(model_dir), device="cpu"), QuantizationConfig(mode="4bit"))
    lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    torch.manual_seed(1)
    sb.add_adapter("policy", lora)
    sb.add_adapter("reward", lora)
    sb.add_head("reward")
    with torch.no_grad():  # non-zero B: the SFT policy differs from the base, the reward model from both
        for name, p in sb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    sb.save_adapter("policy", out / "sft", stage="sft")
    sb.save_adapter("reward", out / "reward", stage="reward", reward_offset=REWARD_OFFSET)
    return out / "sft", out / "reward"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("stages"))


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


def trainer_with_adapters(tiny_recipe, adapters, **ppo):
    sft, reward = adapters
    recipe = recipe_from_dict(tiny_recipe(ppo={**FAST_PPO, "sft_adapter": str(sft), "reward_adapter": str(reward),
                                               **ppo}))
    return build_trainer(recipe, resolve_sources(recipe), PROMPTS)


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


def test_one_step_trains_policy_value_and_head_and_nothing_else(tiny_recipe, adapters):
    trainer = trainer_with_adapters(tiny_recipe, adapters)
    sb = trainer.models["policy"]
    assert all(trainer.models[r] is sb for r in ("reference", "reward", "value"))  # one base, four roles
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


def test_rollout_quantities_line_up_with_unpadded_forwards(tiny_recipe, adapters):
    """Left-padded queries, right-padded responses: every per-token number equals a plain forward of that one
    sequence without padding, and the score is the reward head at its last token minus the offset."""
    trainer = trainer_with_adapters(tiny_recipe, adapters, temperature=0.7)
    sb, cfg = trainer.models["policy"], trainer.cfg
    trainer._train_mode(False)
    batch = rollout.score(trainer.models, rollout.generate(trainer.models, PROMPTS, cfg), trainer.reward, cfg)
    assert len(set(len(ids) for ids in rollout.encode_prompts(sb.tokenizer, PROMPTS))) > 1  # padding happened
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
            expected_score = sb.scalar("reward", ids, ones)[0, -1] - REWARD_OFFSET
            torch.testing.assert_close(batch.scores[i], expected_score, atol=1e-4, rtol=1e-4)
    # nothing past a response's end counts
    assert (batch.logprobs * (1 - batch.response_mask)).abs().sum() == 0
    assert (batch.values * (1 - batch.response_mask)).abs().sum() == 0


def test_stop_token_ends_responses_and_masks_come_from_lengths(tiny_recipe, adapters):
    trainer = trainer_with_adapters(tiny_recipe, adapters)
    sb = trainer.models["policy"]
    eos = sb.tokenizer.eos_token_id
    bias = torch.zeros(sb.model.config.vocab_size)
    bias[eos] = 1e4  # the model now always says end-of-turn
    hook = sb.model.get_output_embeddings().register_forward_hook(lambda module, inputs, out: out + bias)
    try:
        batch = rollout.generate(trainer.models, PROMPTS, trainer.cfg)
        assert batch.lengths.tolist() == [1] * 4 and batch.ended.all()
        assert batch.responses[:, 0].tolist() == [eos] * 4
        trainer.cfg.stop_token = None  # no stop token: every generated token is real, end-of-turn included
        batch = rollout.generate(trainer.models, PROMPTS, trainer.cfg)
    finally:
        hook.remove()
    assert batch.lengths.tolist() == [trainer.cfg.response_length] * 4 and not batch.ended.any()
    assert (batch.responses == eos).all() and batch.response_mask.all()


def test_exactly_one_copy_of_the_base_weights(tiny_recipe, adapters):
    """All four roles on one base: the process holds one set of 4-bit weights and one embedding matrix more
    than before, also after a PPO step."""
    import bitsandbytes as bnb

    def census():
        gc.collect()
        quantized = {o.data_ptr() for o in gc.get_objects() if isinstance(o, bnb.nn.Params4bit)}
        embeddings = {o.weight.data_ptr() for o in gc.get_objects() if isinstance(o, torch.nn.Embedding)}
        return quantized, embeddings

    q0, e0 = census()
    trainer = trainer_with_adapters(tiny_recipe, adapters)
    trainer.step()
    q1, e1 = census()
    sb = trainer.models["policy"]
    n_linear4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in sb.model.modules())
    assert n_linear4bit == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert len(q1 - q0) == n_linear4bit
    assert len(e1 - e0) == 1


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
    from lora_rlhf.base import load_tokenizer

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
