"""PPO's pure functions against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from lora_rlhf.recipe.ppo import PPOSection
from lora_rlhf.stages.ppo import losses
from lora_rlhf.stages.ppo.kl import KLController, RunningMoments, make_kl_controller
from lora_rlhf.stages.ppo.rollout import truncate_after_stop

T = torch.tensor


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=atol, rtol=1e-5)


def test_masked_mean_and_var_ignore_padding():
    values = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    # mean of 1, 2, 3 = 2; squared deviations 1, 0, 1 -> biased var 2/3, unbiased 2/3 * 3/2 = 1
    assert losses.masked_mean(values, mask).item() == pytest.approx(2.0)
    assert losses.masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    assert losses.masked_var(values, mask).item() == pytest.approx(1.0)


def test_masked_whiten():
    values = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    # (x - 2) / sqrt(1): -1, 0, 1; padding -> 0
    close(losses.masked_whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]])
    # shift_mean=False adds the mean back: 1, 2, 3
    close(losses.masked_whiten(values, mask, shift_mean=False), [[1, 2, 3, 0]])


def test_kl_estimators():
    logprobs = T([[math.log(0.5), math.log(0.25)]])
    ref = T([[math.log(0.25), math.log(0.5)]])
    # log r = ref - new: [log 0.5, log 2] = [-0.6931, 0.6931]
    # k1 = -log r = [0.6931, -0.6931]
    close(losses.kl_penalty(logprobs, ref, "k1"), [[math.log(2), -math.log(2)]])
    # k3 = (r - 1) - log r: r = 0.5 -> -0.5 + 0.6931 = 0.1931; r = 2 -> 1 - 0.6931 = 0.3069
    close(losses.kl_penalty(logprobs, ref, "k3"), [[0.19315, 0.30685]])
    # identical policies: both estimators are exactly 0
    assert losses.kl_penalty(ref, ref, "k3").abs().max().item() == 0.0


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    kl = T([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # lengths 2 and 3
    rewards, non_score = losses.shaped_rewards(T([1.0, 2.0]), kl, kl_coef=0.5, mask=mask)
    # non-score = -0.5 * kl on real tokens: [-0.05, -0.1, 0], [-0.2, -0.25, -0.3]
    close(non_score, [[-0.05, -0.1, 0.0], [-0.2, -0.25, -0.3]])
    # the score goes to index length - 1: row 0 -> position 1 (-0.1 + 1), row 1 -> position 2 (-0.3 + 2)
    close(rewards, [[-0.05, 0.9, 0.0], [-0.2, -0.25, 1.7]])


def test_gae_by_hand():
    rewards = T([[0.0, 1.0, 5.0]])
    values = T([[0.5, 0.25, 9.0]])
    mask = T([[1.0, 1.0, 0.0]])  # two real tokens: the third value and reward are padding
    adv, ret = losses.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=1 (last real): delta = 1 + 0.9 * 0 - 0.25 = 0.75; A1 = 0.75
    # t=0: delta = 0 + 0.9 * 0.25 - 0.5 = -0.275; A0 = -0.275 + 0.9 * 0.5 * 0.75 = 0.0625
    close(adv, [[0.0625, 0.75, 0.0]])
    # returns = A + V: 0.5625, 1.0, 0 on padding
    close(ret, [[0.5625, 1.0, 0.0]])


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = T([[1.0, 2.0, 3.0]])
    values = T([[4.0, 5.0, 6.0]])
    adv, ret = losses.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # A_t = sum_{k>=t} r_k - V_t: 6 - 4, 5 - 5, 3 - 6
    close(adv, [[2.0, 0.0, -3.0]])
    close(ret, [[6.0, 5.0, 3.0]])


def test_policy_loss_clips():
    old = torch.zeros(1, 3)
    new = T([[math.log(1.5), math.log(0.5), 0.0]])  # ratios 1.5, 0.5, 1.0
    adv = T([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = losses.policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: A=1, r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped term wins)
    # token 1: A=1, r=0.5 -> max(-0.5, -0.8) = -0.5 (unclipped; the pessimistic bound)
    # token 2: A=-2, r=1 -> max(2, 2) = 2
    # mean: (-1.2 - 0.5 + 2) / 3 = 0.1
    assert loss.item() == pytest.approx(0.1)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio"].item() == pytest.approx(1.0)
    # approxkl = 0.5 * mean(log r ^ 2) = 0.5 * (0.4055^2 + 0.6931^2 + 0) / 3
    assert stats["approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_policy_loss_ignores_padding_and_has_the_ppo_gradient():
    old = torch.zeros(1, 2)
    new = torch.zeros(1, 2, requires_grad=True)
    adv = T([[2.0, 1000.0]])
    loss, _ = losses.policy_loss(new, old, adv, T([[1.0, 0.0]]), cliprange=0.2)
    loss.backward()
    # at ratio 1: d(-A r)/d logp = -A on the real token; the padded token gets no gradient
    close(new.grad, [[-2.0, 0.0]])


def test_value_loss_clips():
    old = T([[1.0, 1.0]])
    new = T([[2.0, 0.9]])
    returns = T([[3.0, 0.0]])
    loss, stats = losses.value_loss(new, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: clip(2, 0.8, 1.2) = 1.2; max((2-3)^2, (1.2-3)^2) = max(1, 3.24) = 3.24 (clipped wins)
    # token 1: clip(0.9) = 0.9;        max(0.81, 0.81) = 0.81
    # 0.5 * mean = 0.5 * (3.24 + 0.81) / 2 = 1.0125
    assert loss.item() == pytest.approx(1.0125)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_truncate_after_stop_uses_the_first_stop_and_keeps_it():
    stop, pad = 2, 0
    responses = T([[5, 2, 7, 2], [0, 6, 7, 8], [2, 9, 9, 9]])
    out, lengths, ended = truncate_after_stop(responses, stop, pad)
    # row 0 stops at index 1 (length 2); row 1 never stops, and its generated pad id 0 is a real token
    assert lengths.tolist() == [2, 4, 1]
    assert ended.tolist() == [True, False, True]
    assert out.tolist() == [[5, 2, 0, 0], [0, 6, 7, 8], [2, 0, 0, 0]]
    # without a stop token every token counts, even the stop id
    _, lengths, ended = truncate_after_stop(responses, None, pad)
    assert lengths.tolist() == [4, 4, 4] and not ended.any()


def test_adaptive_kl_controller_follows_ziegler():
    ctl = KLController(value=0.1, target=6.0, horizon=100)
    # KL 9 -> error = clip(9/6 - 1, -0.2, 0.2) = 0.2; beta *= 1 + 0.2 * 10 / 100 = 1.02
    assert ctl.update(9.0, 10) == pytest.approx(0.102)
    # KL 3 -> error = clip(-0.5) = -0.2; beta *= 1 - 0.02 = 0.98
    assert ctl.update(3.0, 10) == pytest.approx(0.102 * 0.98)
    state = ctl.state_dict()
    other = KLController(value=1.0)
    other.load_state_dict(state)
    assert other.value == ctl.value and other.target == 6.0


def test_fixed_kl_controller_never_changes():
    ctl = make_kl_controller(PPOSection(kl_coef=0.2, adaptive_kl=False, reward_fn="m:f"))
    assert ctl.update(1000.0, 64) == 0.2


def test_running_moments_match_the_whole_history():
    stats = RunningMoments()
    stats.update([1.0, 2.0, 3.0])
    stats.update([10.0])
    # all four values: mean 4, population variance ((9 + 4 + 1 + 36) / 4) = 12.5
    assert stats.mean == pytest.approx(4.0)
    assert stats.var == pytest.approx(12.5)
    assert stats.normalize(4.0 + math.sqrt(12.5)) == pytest.approx(1.0)


def test_config_rejects_inconsistent_batch_settings():
    with pytest.raises(ValueError, match="multiple of gradient_accumulation_steps"):
        PPOSection(batch_size=8, num_mini_batches=2, gradient_accumulation_steps=3)
    with pytest.raises(ValueError, match="missing_eos_penalty needs stop_token"):
        PPOSection(stop_token=None, missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match="unknown tracker"):
        PPOSection(report_to=["tensorbored"])


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # two prompts x K=3: rewards (1, 2, 6) and (0, 0, 3)
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    adv = losses.group_advantages(rewards, 3, "rloo")
    # 1 - (2+6)/2 = -3;  2 - (1+6)/2 = -1.5;  6 - (1+2)/2 = 4.5;  0 - 1.5 = -1.5 twice;  3 - 0 = 3
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    assert torch.allclose(adv.view(2, 3).sum(1), torch.zeros(2))  # leave-one-out advantages sum to 0 per group


def test_grpo_standardises_within_each_prompt_and_ties_give_zero():
    rewards = torch.tensor([1.0, 3.0, 5.0, 7.0, 7.0, 7.0])
    adv = losses.group_advantages(rewards, 3, "grpo", eps=0.0 + 1e-12)
    # group 1: mean 3, std (unbiased) 2 -> (-1, 0, 1); group 2: all tied -> 0 (nothing to prefer)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_group_advantages_refuse_incomplete_groups():
    with pytest.raises(ValueError, match="do not form groups of 3"):
        losses.group_advantages(torch.zeros(4), 3, "rloo")


def test_sequence_reward_is_the_score_minus_the_summed_kl_penalty():
    kl = torch.tensor([[0.5, 0.5, 9.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: 2 - 0.1 * (0.5 + 0.5) = 1.9 (padding's 9 ignored); row 1: 0 - 0.1 * 1 = -0.1
    torch.testing.assert_close(losses.sequence_rewards(torch.tensor([2.0, 0.0]), kl, 0.1, mask),
                               torch.tensor([1.9, -0.1]))


def _batch_of(texts):
    from types import SimpleNamespace

    return SimpleNamespace(prompts=["p"] * len(texts), texts=texts, lengths=torch.ones(len(texts), dtype=torch.long))


def test_a_reward_function_must_return_numbers_not_strings():
    from lora_rlhf.errors import DataError
    from lora_rlhf.stages.ppo.rollout import RewardSource, function_scores

    ok = RewardSource("mine:score", fn=lambda prompts, responses: [1, 2.5])
    assert function_scores(ok, _batch_of(["a", "b"])).tolist() == [1.0, 2.5]
    as_tensor = RewardSource("mine:score", fn=lambda prompts, responses: torch.tensor([0.5, -1.0]))
    assert function_scores(as_tensor, _batch_of(["a", "b"])).tolist() == [0.5, -1.0]
    for bad in (["1.5", "2"], [True, False], "12", None):
        with pytest.raises(DataError, match="must return a list of numbers"):
            function_scores(RewardSource("mine:score", fn=lambda p, r, bad=bad: bad), _batch_of(["a", "b"]))


def test_a_reward_function_that_raises_is_one_line_saying_where():
    from lora_rlhf.errors import DataError
    from lora_rlhf.stages.ppo.rollout import RewardSource, function_scores

    def broken(prompts, responses):
        return [len(r) / 0 for r in responses]

    with pytest.raises(DataError, match=r"reward function mine:broken raised ZeroDivisionError: division by zero "
                                        r"\(at .*test_ppo_losses.py:\d+\)"):
        function_scores(RewardSource("mine:broken", fn=broken), _batch_of(["a"]))
