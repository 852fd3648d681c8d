"""What runs differently on a GPU (issue 25), checked on the CPU where it can be, and on CUDA under the device
switch (LORA_RLHF_TEST_DEVICE=cuda, tests/helpers.py). Tiny Llama, PPO roles from tests/helpers.py."""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import FAST_PPO, PROMPTS, TEST_DEVICE, trainer_with_adapters

from lora_rlhf.core import loading
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.generation import generate_ids
from lora_rlhf.core.heads import ScalarHead
from lora_rlhf.core.logprobs import entropy, token_logprobs
from lora_rlhf.recipe.config import ModelConfig, recipe_from_dict
from lora_rlhf.stages.ppo import checkpoint as ckpt
from lora_rlhf.stages.ppo import losses, rollout
from lora_rlhf.stages.ppo.roles import resolve_sources
from lora_rlhf.stages.ppo.trainer import build_trainer


def first_ratio(trainer, monkeypatch) -> dict[str, torch.Tensor]:
    """The statistics of the first policy loss of a PPO step (before any update)."""
    seen = []
    real = losses.policy_loss
    monkeypatch.setattr(losses, "policy_loss", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    trainer.step()
    return seen[0][1]


# ----------------------------------------------------------------------------------- 4. rollout memory
def test_a_rollout_chunk_frees_its_generation_output_before_the_next_one_generates(tiny_recipe, stage_adapters,
                                                                                  monkeypatch):
    """Held by the loop, a chunk's generation output (R x [b, V] logits) stayed alive while the next chunk
    generated: two chunks' logits at once."""
    trainer = trainer_with_adapters(tiny_recipe, stage_adapters, local_rollout_forward_batch_size=2)
    sb, cfg = trainer.sb, trainer.cfg
    sb.train(False)
    earlier: list[weakref.ref] = []
    chunks = []
    real = sb.model.generate

    def generate(*args, **kwargs):
        assert all(ref() is None for ref in earlier), "an earlier chunk's generation output is still alive"
        out = real(*args, **kwargs)
        earlier.extend(weakref.ref(t) for t in (out.logits or ()))  # no logits kept on a GPU
        earlier.append(weakref.ref(out))
        chunks.append(len(out.sequences))
        return out

    monkeypatch.setattr(sb.model, "generate", generate)
    batch = rollout.generate(sb, PROMPTS, cfg)
    assert len(batch.prompts) == 4 and chunks == [2, 2]


# ----------------------------------------------------------------------------------- 7. old log-probs
def test_old_log_probs_come_from_the_training_forward_where_decoding_differs(tiny_recipe, stage_adapters,
                                                                             monkeypatch):
    """On a GPU decoding (bitsandbytes' inference kernels, KV cache, 16 bits) is not the training forward's
    arithmetic: generation keeps no logits and scoring recomputes the old log-probs with the policy's own forward,
    so the first ratio is 1. Simulated on the CPU by taking the GPU's decision."""
    assert rollout.keeps_generation_logprobs(torch.device("cpu"))
    assert not rollout.keeps_generation_logprobs(torch.device("cuda"))
    monkeypatch.setattr(rollout, "keeps_generation_logprobs", lambda device: False)
    trainer = trainer_with_adapters(tiny_recipe, stage_adapters)
    sb, cfg = trainer.sb, trainer.cfg
    sb.train(False)
    torch.manual_seed(0)
    requested = []
    real = sb.model.generate
    monkeypatch.setattr(sb.model, "generate", lambda *a, **k: requested.append(k["output_logits"]) or real(*a, **k))
    batch = rollout.generate(sb, PROMPTS, cfg)
    assert batch.logprobs is None and requested == [False]
    scored = rollout.score(sb, batch, trainer.reward, cfg)
    with torch.no_grad(), sb.use("policy"):
        again = rollout.response_logprobs(sb, scored, cfg.temperature)[0]
    torch.testing.assert_close(scored.logprobs, again, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(scored.logprobs, scored.ref_logprobs, atol=1e-4, rtol=1e-4)  # policy = SFT copy
    stats = first_ratio(trainer, monkeypatch)
    assert abs(stats["ratio"].item() - 1.0) < 1e-4 and stats["approxkl"].item() < 1e-8


@pytest.mark.cuda_only("measures the gap of the GPU's 16-bit kernels")
def test_in_bf16_on_a_gpu_the_first_ratio_is_one_to_bf16s_precision(tiny_recipe, stage_adapters, monkeypatch):
    """The remaining gap on a GPU: old log-probs from a no-grad forward (bitsandbytes' 4-bit GEMM for small
    inputs) against the training forward (dequantize + matmul), both under bf16 autocast. The bounds are bf16's
    precision (8 mantissa bits), a first guess for the first GPU run to confirm; the numbers are printed."""
    if not torch.cuda.is_available() or not loading.native_bf16(torch.device("cuda")):
        pytest.skip("needs a GPU with native bf16")
    sft, reward = stage_adapters
    recipe = recipe_from_dict(tiny_recipe(model={"name": tiny_recipe()["model"]["name"], "device": "cuda",
                                                 "dtype": "bf16"},
                                          ppo={**FAST_PPO, "sft_adapter": str(sft), "reward_adapter": str(reward)}))
    trainer = build_trainer(recipe, resolve_sources(recipe), PROMPTS)
    assert trainer.sb.autocast_dtype == torch.bfloat16
    torch.manual_seed(0)
    stats = first_ratio(trainer, monkeypatch)
    print(f"bf16 first step: ratio {stats['ratio'].item():.6f}, approxkl {stats['approxkl'].item():.3g}")
    assert abs(stats["ratio"].item() - 1.0) < 1e-2 and stats["approxkl"].item() < 1e-3


# ----------------------------------------------------------------------------------- 9. one log-prob path
def test_log_probs_and_entropy_never_take_trls_triton_kernels(tiny_recipe, stage_adapters, monkeypatch):
    """TRL 1.16 sends CUDA logits to Triton kernels from selective_log_softmax / entropy_from_logits: the code the
    CPU tests pin would not be what a GPU runs. Here TRL is told every tensor is one it would send there, and its
    kernel fails: rollout, scoring, the training log-probs and eval's teacher forcing must not reach it."""
    import trl.trainer.utils as trl_utils

    from lora_rlhf.stages.eval.evaluate import sequence_logprobs

    def kernel(*args, **kwargs):
        raise AssertionError("TRL's Triton kernel was called")

    monkeypatch.setattr(trl_utils, "is_triton_available", lambda: True)
    monkeypatch.setattr(trl_utils, "_supports_trl_loss_kernel", lambda *a, **k: True)
    monkeypatch.setattr(trl_utils, "_fused_logprob_entropy", kernel, raising=False)
    trainer = trainer_with_adapters(tiny_recipe, stage_adapters)
    sb, cfg = trainer.sb, trainer.cfg
    batch = rollout.score(sb, rollout.generate(sb, PROMPTS, cfg), trainer.reward, cfg)
    with sb.use("policy"):
        logprobs, ent = rollout.response_logprobs(sb, batch, cfg.temperature, with_entropy=True)
    logprobs.sum().backward()
    ids = batch.query_responses[0][batch.attention_mask[0].bool()].tolist()
    sequence_logprobs(sb, "policy", [ids], [batch.context_length - 1], temperature=0.7)
    assert ent.shape == logprobs.shape


def test_our_log_probs_and_entropy_are_the_textbook_formulas():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=generator) * 4).to(TEST_DEVICE).requires_grad_()
    tokens = torch.randint(50, (3, 5), generator=generator).to(TEST_DEVICE)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(token_logprobs(logits, tokens), logp.gather(-1, tokens[..., None])[..., 0])
    torch.testing.assert_close(token_logprobs(logits[0, 0], tokens[0, 0]), logp[0, 0, tokens[0, 0]])
    torch.testing.assert_close(entropy(logits, chunk_size=4), -(logp.exp() * logp).sum(-1))
    assert token_logprobs(logits.bfloat16(), tokens).dtype == torch.float32
    grad, = torch.autograd.grad(token_logprobs(logits, tokens).sum(), logits)
    expected, = torch.autograd.grad(logp.gather(-1, tokens[..., None]).sum(), logits)
    torch.testing.assert_close(grad, expected)


# ----------------------------------------------------------------------------------- 10. sampling settings
def test_a_models_own_generation_defaults_never_reach_ppo_or_eval_sampling(tiny_recipe, stage_adapters,
                                                                             monkeypatch):
    """transformers fills every setting a generate call leaves unset from the model's generation_config: a Hub
    model's repetition_penalty 1.05 (or min_p, suppress_tokens) would reshape PPO's samples, whose log-probs
    describe the plain tempered softmax. Every sampling setting is the recipe's or transformers' neutral one."""
    from transformers.generation.utils import GenerationMixin

    trainer = trainer_with_adapters(tiny_recipe, stage_adapters, top_k=0, top_p=0.9, temperature=0.8)
    sb, cfg = trainer.sb, trainer.cfg
    own = sb.model.get_base_model().generation_config
    own.repetition_penalty, own.min_p, own.suppress_tokens, own.no_repeat_ngram_size = 1.05, 0.3, [5, 6], 2
    used = []
    real = GenerationMixin._prepare_generation_config

    def spy(self, generation_config, **kwargs):
        config, model_kwargs = real(self, generation_config, **kwargs)
        used.append(config)
        return config, model_kwargs

    monkeypatch.setattr(GenerationMixin, "_prepare_generation_config", spy)
    rollout.generate(sb, PROMPTS, cfg)
    generate_ids(sb, PROMPTS[:2], "policy", max_new_tokens=4, temperature=0.7, top_p=0.95)
    assert len(used) == 2
    for config in used:
        assert config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0
        assert config.min_p is None and config.suppress_tokens is None
        assert config.do_sample and config.top_k == 0 and config.num_beams == 1
    ppo = used[0]
    assert (ppo.temperature, ppo.top_p, ppo.max_new_tokens) == (0.8, 0.9, cfg.response_length)
    assert (used[1].temperature, used[1].top_p) == (0.7, 0.95)
    assert own.repetition_penalty == 1.05 and sb.model.get_base_model().generation_config is own  # put back


# ----------------------------------------------------------------------------------- 11, 8. compute dtype
@pytest.mark.cpu_only("forces 16-bit autocast onto the CPU to see PPO's forwards take it")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ppo_forwards_autocast_to_the_compute_dtype_and_fp16_scales_the_loss(tiny_recipe, stage_adapters, monkeypatch, tmp_path,
                                                                            dtype):
    """On a GPU a prepared 4-bit base streams fp32 (k-bit preparation upcasts embeddings, norms and LM head) and
    computed everything in fp32: PPO's forwards (rollout, scoring, training) now autocast to the compute dtype,
    as the Trainer does for sft and reward. The heads stay fp32. fp16 (GPUs without native bf16) scales the loss
    with a GradScaler whose state a checkpoint keeps. Simulated on the CPU by giving the base a GPU's decision."""
    monkeypatch.setattr(SharedBase, "autocast_dtype", property(lambda self: dtype))
    trainer = trainer_with_adapters(tiny_recipe, stage_adapters)
    sb = trainer.sb
    assert trainer.scaler.is_enabled() == (dtype == torch.float16)
    seen = []
    hooks = [module.register_forward_hook(lambda m, args, out: seen.append(torch.get_autocast_dtype("cpu")
                                                                          if torch.is_autocast_enabled("cpu")
                                                                          else None))
             for module in (sb.lm_head(), sb.backbone())]
    scaled = []
    real_scale = trainer.scaler.scale
    monkeypatch.setattr(trainer.scaler, "scale", lambda loss: scaled.append(loss.detach()) or real_scale(loss))
    metrics, batch = trainer.step()
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {dtype}, seen  # every forward of the step: rollout, scoring, policy, value
    assert len(scaled) == 2 * FAST_PPO["num_mini_batches"]  # policy and value backward of each micro-batch
    assert batch.values.dtype == torch.float32 and batch.scores.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in trainer.params)

    ckpt.save_checkpoint(tmp_path, sb, trainer.optimizer, trainer.scheduler, trainer.state_dict(), None,
                         trainer.scaler)
    saved = torch.load(tmp_path / ckpt.CHECKPOINT / ckpt.OPTIMIZER_FILE, weights_only=True)["scaler"]
    assert bool(saved) == (dtype == torch.float16)
    if saved:
        trainer.scaler.update(123.0)
        ckpt.load_checkpoint(tmp_path / ckpt.CHECKPOINT, sb, trainer.optimizer, trainer.scheduler, 0, trainer.scaler)
        assert trainer.scaler.get_scale() == saved["scale"]


def test_a_scalar_head_stays_fp32_under_autocast():
    head = ScalarHead(16)
    hidden = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(hidden)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head(hidden))


def test_no_autocast_on_the_cpu_or_in_fp32():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loading.autocast_dtype(cpu, torch.bfloat16) is None and loading.autocast_dtype(gpu, torch.float32) is None
    assert loading.autocast_dtype(gpu, torch.bfloat16) == torch.bfloat16
    assert loading.autocast_dtype(gpu, torch.float16) == torch.float16


# ----------------------------------------------------------------------------------- 12. dtype auto
@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
                         ids=["V100", "T4", "A100", "H100"])
def test_dtype_auto_takes_the_16_bit_type_the_gpu_computes_natively(monkeypatch, capability, expected):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4, which only emulate bf16: auto picked it there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert loading.compute_dtype(ModelConfig(dtype="auto"), torch.device("cuda", 0)) == expected
    assert loading.compute_dtype(ModelConfig(dtype="auto"), torch.device("cpu")) == torch.float32
    assert loading.compute_dtype(ModelConfig(dtype="bf16"), torch.device("cuda", 0)) == torch.bfloat16


# ----------------------------------------------------------------------------------- 6. reserved memory
def test_a_gpu_stage_reports_its_reserved_peak_beside_the_allocated_one(monkeypatch):
    """The caching allocator's reserve (allocated + fragmentation) is what runs out; max_memory_allocated alone
    is blind to it."""
    from lora_rlhf.stages.memory import StageMemory

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * 2**30)
    metrics = StageMemory(torch.device("cuda", 0), 5 * 2**30).metrics()
    assert metrics == {"memory/peak_gb": 3.0, "memory/predicted_gb": 5.0, "memory/peak_reserved_gb": 4.0}
    assert "memory/peak_reserved_gb" not in StageMemory(torch.device("cpu"), 0).metrics()
