"""Peak memory of each stage, as pure functions of a model's shape and the recipe's numbers. No torch, no I/O.

A stage runs as phases (load, train; PPO: rollout, scoring, optimisation); each phase's memory is the sum of
named parts, and the stage's peak is its largest phase. Every part is a count times a byte size, from what
the code keeps alive (lora_rlhf.core.base, lora_rlhf.stages.*, TRL's trainers):

    weights      quantized linear layers (NF4: 0.5 byte/param + absmax constants per 64-block; double
                 quantization stores those in 8 bits + one fp32 per 256 blocks), embeddings / LM head / norms
                 in the compute dtype (fp32 once prepared for k-bit training: PEFT upcasts them)
    adapters     LoRA A [r, in] + B [out, r] per targeted layer, fp32 (PEFT's default; we keep them fp32);
                 trainable roles add the gradient and AdamW's two moments: 16 bytes/param
    activations  what autograd saves for backward, per token per layer (counted with saved-tensor hooks on
                 Llama layers, see ACT_*), or only each layer's input with gradient checkpointing plus one
                 layer recomputed; fp32 on a k-bit base prepared for training (`stream_bytes`)
    logits       [B, R, V] in the compute dtype plus the copies softmax-based log-probs make
    KV cache     2 * layers * kv_heads * head_dim * bytes * rows * (prompt + response) while generating
    runtime      CPU: the interpreter with torch / transformers / TRL / PEFT imported (resident set);
                 CUDA: the context (not in torch.cuda.max_memory_allocated, but taken from the free memory)
    headroom     CPU: glibc's heap slack (measured); CUDA: the caching allocator's reserve above the tensors

Units: bytes everywhere; B = sequences in a forward, T = tokens per sequence, V = vocabulary, H = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from lora_rlhf.plan.model_shape import ModelShape

GB = 1024**3

# --- constants measured on this project's stack (torch 2.13, transformers 5.23, peft 0.21, bitsandbytes 0.50)
CPU_RUNTIME = 560 * 2**20        # RSS after importing the stages (527 MB measured) + a margin for TRL's trainers
CUDA_CONTEXT = 500 * 2**20       # CUDA context + kernels of torch/bitsandbytes (typical, not in max_memory_allocated)
NF4_BLOCK = 64                   # bitsandbytes' 4-bit block size: one absmax per 64 weights
DQ_BLOCK = 256                   # double quantization: one fp32 scale per 256 absmax values
# Saved for backward per token per decoder layer, in elements of the compute dtype, with an attention mask
# (every stage passes one): 8H + 4I + T + r per LoRA-targeted module (+ 2 * heads + 8 small tensors).
# Measured with torch.autograd.graph.saved_tensors_hooks on three tiny Llamas and SmolLM2-135M
# (tests/test_plan.py checks it): exact to within 1 %.
ACT_H, ACT_I = 8, 4
# LoRA dropout > 0 keeps a dropped-out copy of each targeted layer's input and its mask: 1.45 x those widths.
ACT_DROPOUT = 1.45
# With gradient checkpointing only each layer's input (H per token) stays, plus one layer recomputed in backward.
ADAM_BYTES = 8                   # AdamW: exp_avg + exp_avg_sq, fp32
ADAM_8BIT_BYTES = 2              # bitsandbytes' 8-bit AdamW (sft/reward `optim: *adamw_8bit`)
# RSS above the live tensors on the CPU: glibc keeps freed activations (many tensors of a few MB, served from its
# heap) between steps, so the high-water mark exceeds the live set by a share of them (fitted on bench_plan.py).
# Vocabulary-sized logits are large enough to be mmapped and returned on free: no slack on them.
CPU_HEAP_SLACK = 0.5
# PPO's training forwards honour model.gradient_checkpointing (measured with bench/bench_plan.py: the anchor
# configuration peaks at 3.67 GB without it, 2.50 GB with it).
PPO_CHECKPOINTS = True
# ...and with it, PPO's backward leaves less heap slack than the full backward's on the CPU: measured (bench_plan
# --repeat 3, medians) 0.55 x on ppo-anchor-ckpt and 0.61 x on ppo-135m-4bit-ckpt, single runs up to 0.9 x; 0.75
# keeps the runs' spread on the safe side. SFT and reward (TRL's checkpointing) keep the full slack (measured).
CPU_PPO_CHECKPOINTED_SLACK = 0.75
# ...and PPO's optimisation holds more heap per token the longer its rows: measured (bench_plan ppo-anchor with
# 41-, 128- and 192-token prompts, 48-token responses, --repeat 3 medians) the activations + slack above fit at 89
# tokens and fall short by 22 % at 176 and 38 % at 240, i.e. by (tokens - 89) / 400 of themselves. Not a property
# of the attention (SDPA's CPU kernels measure linear in T) nor of SFT (rows of 256 fit): the value's forward on
# long rows reuses less of the heap the policy's backward freed. Counted from 89 tokens, where the slack was fitted.
CPU_PPO_LONG_ROWS = (89, 400)
CPU_ADAPTER_SETUP = 0.8
# The reward stage's backward (TRL's RewardTrainer, a sequence classifier: no vocabulary-sized logits) leaves
# less slack than SFT's: its full CPU_HEAP_SLACK predicted above every one of ten bench_plan runs (2.56-3.02 GB,
# median 2.84, against 3.15 predicted); 0.7 x of it predicts 2.91: +2.5 % on that median, under four runs by 1-4 %.
CPU_REWARD_SLACK = 0.7
# TRL's fused LM head (DPO): log-probs are folded tile by tile, never as [B, T, V] logits. A tile is at most
# [4096 tokens, 32768 vocabulary entries] (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, kernels/chunked_logprob
# TOKEN_CHUNK_SIZE). On the CPU its torch fallback's backward peaks at 8.4-8.8 fp32 tiles (measured with VmHWM on
# trl 1.16's ChunkedLogProbFunction at 512-2048 tokens, a 49152 vocabulary); on CUDA the Triton kernels work in
# place on the tile and one fp32 buffer (read from the source, not measured).
FUSED_TILE_TOKENS, FUSED_TILE_VOCAB = 4096, 32768
FUSED_TILES = {"cpu": 8.8, "cuda": 2}
# On a GPU the caching allocator reserves more than the live tensors (blocks cut for one size, freed, and not
# reusable for the next: fragmentation), and a stage runs out when its reserved memory meets the free memory, not
# its allocated. A share of each phase's tensors is planned on top. Not measured yet (no GPU in this project so
# far): bench/bench_plan.py --device cuda compares the plan with torch.cuda.max_memory_reserved to fit it.
CUDA_ALLOCATOR_HEADROOM = 0.10

Device = Literal["cpu", "cuda"]
QuantMode = Literal["4bit", "8bit", "none"]


@dataclass(frozen=True)
class Base:
    """How the shared base is loaded and what adapters look like: the parts of a recipe every stage shares."""

    device: Device
    dtype_bytes: int                  # compute dtype: 4 fp32, 2 bf16/fp16
    quant: QuantMode
    double_quant: bool = True
    lora_r: int = 16
    lora_targets: str | list[str] = "all-linear"
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False
    optim_state_bytes: int = ADAM_BYTES  # per trainable parameter


@dataclass(frozen=True)
class Part:
    """One named amount of memory inside a phase."""

    name: str
    bytes: int
    note: str = ""


@dataclass
class Phase:
    name: str
    parts: list[Part] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)


@dataclass
class StageEstimate:
    """The predicted memory of one stage: its phases, the largest of which is the peak."""

    stage: str
    phases: list[Phase]
    settings: dict[str, object] = field(default_factory=dict)  # the numbers it was computed from

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> int:
        return self.peak_phase.total


# ---------------------------------------------------------------------------------------------- resident parts
def runtime(base: Base) -> Part:
    if base.device == "cuda":
        return Part("runtime", CUDA_CONTEXT, "CUDA context and kernels (outside max_memory_allocated)")
    return Part("runtime", CPU_RUNTIME, "Python + torch/transformers/TRL/PEFT/bitsandbytes, imported")


def quantized_linear_bytes(shape: ModelShape, quant: QuantMode, double_quant: bool, dtype_bytes: int) -> int:
    """The decoder's linear weights as loaded: NF4 0.5 byte/param + constants; int8 1 byte + a scale per row."""
    n = shape.linear_params()
    if quant == "4bit":
        blocks = -(-n // NF4_BLOCK)
        constants = blocks + 4 * -(-blocks // DQ_BLOCK) if double_quant else 4 * blocks
        return n // 2 + constants
    if quant == "8bit":
        rows = shape.num_layers * sum(out for _, out in shape.linear_shapes().values())
        return n + 4 * rows
    return n * dtype_bytes


def weight_parts(shape: ModelShape, base: Base, for_training: bool = True, lm_head: bool = True) -> list[Part]:
    """The base's weights. `lm_head=False`: a sequence classifier (the reward stage) has a score head instead."""
    quantized = base.quant != "none"
    # PEFT's prepare_model_for_kbit_training upcasts every non-quantized bf16/fp16 weight to fp32.
    other_bytes = 4 if quantized and for_training else base.dtype_bytes
    label = {"4bit": "NF4" + (" + double-quantized constants" if base.double_quant else " + fp32 absmax"),
             "8bit": "int8 + row scales", "none": f"{base.dtype_bytes}-byte weights"}[base.quant]
    parts = [Part("linear weights", quantized_linear_bytes(shape, base.quant, base.double_quant, base.dtype_bytes),
                  f"{shape.linear_params() / 1e6:.0f}M params, {label}")]
    embed = shape.embedding_params()
    parts.append(Part("embeddings", embed * other_bytes, f"{shape.vocab_size} x {shape.hidden_size}, "
                                                          f"{other_bytes}-byte, unquantized"))
    if lm_head and not shape.tie_word_embeddings:
        parts.append(Part("lm head", shape.lm_head_params() * other_bytes, "untied, unquantized"))
    small = (shape.norm_params() + shape.linear_bias_params()) * other_bytes
    if not lm_head:
        small += shape.hidden_size * 4 * 2  # the score head and PEFT's trainable copy of it
    parts.append(Part("norms, biases, heads", small))
    return parts


def adapter_parts(shape: ModelShape, base: Base, roles: dict[str, bool]) -> list[Part]:
    """LoRA weights per role (role -> trainable); trainable ones with gradient and optimizer state."""
    n = shape.lora_params(base.lora_r, base.lora_targets)
    parts = []
    for role, trainable in roles.items():
        per = 4 + (4 + base.optim_state_bytes if trainable else 0)
        what = "trainable: fp32 weights + grads + AdamW moments" if trainable else "frozen, fp32"
        parts.append(Part(f"lora {role}", n * per + 4 * (shape.hidden_size + 1) * (per if role in ("value", "reward")
                                                                                    else 0),
                          f"{n / 1e6:.2f}M params r={base.lora_r}, {what}"))
    return parts


def load_parts(shape: ModelShape, base: Base, weights: int) -> list[Part]:
    """Memory only loading needs, on top of the final weights (CPU: the memory-mapped checkpoint's pages)."""
    if base.device != "cpu":
        # bitsandbytes quantizes tensor by tensor on the GPU: the largest one in the checkpoint's dtype at a time.
        largest = max(shape.embedding_params(), max(a * b for a, b in shape.linear_shapes().values()))
        return [Part("loading", largest * shape.checkpoint_bytes_per_param, "one tensor being quantized/cast")]
    file = shape.total_params() * shape.checkpoint_bytes_per_param
    if base.quant == "none" and shape.checkpoint_bytes_per_param == base.dtype_bytes:
        return []  # the weights ARE the mapped file's pages
    return [Part("checkpoint file", file, "read through a memory map while quantizing/casting, then released")]


# ---------------------------------------------------------------------------------------------- activations
def lora_dropout_width(shape: ModelShape, base: Base) -> int:
    """Per token per layer: the input widths of the targeted layers (each keeps its own dropped-out copy)."""
    if base.lora_dropout <= 0:
        return 0
    return sum(a for a, _ in shape.lora_targets(base.lora_targets).values())


def saved_per_token_layer(shape: ModelShape, base: Base, seq_len: int) -> float:
    """Elements autograd keeps per token per decoder layer for a forward with grad (no checkpointing)."""
    n_targets = len(shape.lora_targets(base.lora_targets))
    return (ACT_H * shape.hidden_size + ACT_I * shape.intermediate_size + seq_len + base.lora_r * n_targets
            + 2 * shape.num_heads + 8 + ACT_DROPOUT * lora_dropout_width(shape, base))


def stream_bytes(base: Base, for_training: bool = True) -> int:
    """Bytes per element of the residual stream, the activations saved for backward, the layers' temporaries and
    the KV cache. On a quantized base prepared for training they are fp32 whatever the compute dtype: PEFT's
    prepare_model_for_kbit_training upcasts embeddings, norms and the LM head to fp32, and bitsandbytes' 4-bit
    (and 8-bit) layers return their input's dtype, so the stream never leaves fp32, under autocast too (only the
    matmuls inside run in 16 bits). A base loaded for inference (compare, eval) keeps the compute dtype."""
    return 4 if for_training and base.quant != "none" else base.dtype_bytes


def activation_bytes(shape: ModelShape, base: Base, rows: int, seq_len: int) -> int:
    """Saved activations of a forward with grad over rows x seq_len tokens, held until backward."""
    tokens = rows * seq_len
    width = stream_bytes(base)
    per_layer = saved_per_token_layer(shape, base, seq_len) * tokens * width
    if base.gradient_checkpointing:
        # each layer's input stays; backward recomputes one layer at a time with everything it saves
        return int(shape.num_layers * tokens * (shape.hidden_size + 19) * width + per_layer)
    return int(shape.num_layers * per_layer)


def backward_churn(shape: ModelShape, base: Base, rows: int, seq_len: int) -> int:
    """What one backward allocates and frees in all: the full activations, with or without checkpointing
    (checkpointing recomputes every layer once, so the volume that passes through the CPU heap, and the slack
    it leaves there, is the same; measured on PPO and SFT in bench_plan.py)."""
    return activation_bytes(shape, replace(base, gradient_checkpointing=False), rows, seq_len)


def layer_workspace(shape: ModelShape, base: Base, tokens: int, for_training: bool = True) -> int:
    """Temporaries of one layer's forward (no grad) or backward: hidden states, the MLP's inner width, grads."""
    return int(tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size) * stream_bytes(base, for_training))


def heap_slack(base: Base, transient: int) -> list[Part]:
    if base.device != "cpu" or transient <= 0:
        return []
    return [Part("allocator slack", int(CPU_HEAP_SLACK * transient), "freed temporaries glibc keeps mapped")]


def _phase(base: Base, name: str, parts: list[Part]) -> Phase:
    """A phase; on CUDA with the caching allocator's headroom over its tensors (CUDA_ALLOCATOR_HEADROOM)."""
    if base.device == "cuda":
        tensors = sum(p.bytes for p in parts if p.name != "runtime")
        parts = [*parts, Part("allocator headroom", int(CUDA_ALLOCATOR_HEADROOM * tensors),
                              "CUDA caching allocator: reserved beyond the live tensors (fragmentation)")]
    return Phase(name, parts)


# ---------------------------------------------------------------------------------------------- stages
def _resident(shape: ModelShape, base: Base, roles: dict[str, bool], for_training: bool = True,
              lm_head: bool = True) -> list[Part]:
    return [runtime(base), *weight_parts(shape, base, for_training, lm_head), *adapter_parts(shape, base, roles)]


def _load_phase(shape: ModelShape, base: Base, for_training: bool = True, lm_head: bool = True) -> Phase:
    parts = [runtime(base), *weight_parts(shape, base, for_training, lm_head)]
    parts += load_parts(shape, base, sum(p.bytes for p in parts[1:]))
    if base.device == "cpu" and base.quant == "4bit":
        # measured (bench_plan.py): putting PEFT adapters on a 4-bit CPU base right after loading raises the
        # resident set by ~0.8 x an fp32 copy of the linear weights before it settles
        parts.append(Part("adapter setup", int(CPU_ADAPTER_SETUP * shape.linear_params() * 4),
                          "CPU 4-bit: measured while PEFT wraps the base"))
    return _phase(base, "load", parts)


def sft_estimate(shape: ModelShape, base: Base, batch: int, max_length: int) -> StageEstimate:
    """`lora-rlhf sft`: TRL's SFTTrainer, one trainable adapter, batches padded to at most max_length.

    The loss goes through the model's own LM head and cross-entropy over [B, T, V]: the logits in the compute
    dtype, an fp32 copy (when not fp32 already), the log-softmax kept for backward, and in backward the
    gradients of both (measured on the CPU: 5 fp32 vocabulary-sized rows per token).
    """
    tokens = batch * max_length
    acts = activation_bytes(shape, base, batch, max_length)
    logits = tokens * shape.vocab_size * (base.dtype_bytes + 16)
    transient = backward_churn(shape, base, batch, max_length) + layer_workspace(shape, base, tokens)
    train = _phase(base, "train", [*_resident(shape, base, {"policy": True}),
                            Part("activations", acts, _act_note(base, batch, max_length)),
                            Part("logits", logits, f"[{batch}, {max_length}, {shape.vocab_size}] + fp32 copy, "
                                                   "log-softmax and their grads"),
                            Part("backward workspace", layer_workspace(shape, base, tokens)),
                            *heap_slack(base, transient)])
    return StageEstimate("sft", [_load_phase(shape, base), train],
                         {"micro_batch": batch, "max_length": max_length})


def reward_sequences(batch: int, responses_per_prompt: int | None) -> int:
    """Distinct sequences one reward step forwards: 2 per pair, or, for K-wise rankings grouped by prompt (all
    K(K-1)/2 pairs of a prompt in one batch, each response forwarded once), K per prompt in the batch; the
    batcher tops a batch up from one more prompt, hence the +1. Never more than 2 per pair."""
    if not responses_per_prompt or responses_per_prompt < 2:
        return 2 * batch
    k = responses_per_prompt
    prompts = -(-batch // (k * (k - 1) // 2)) + 1
    return min(2 * batch, prompts * k)


def reward_estimate(shape: ModelShape, base: Base, batch: int, max_length: int,
                    responses_per_prompt: int | None = None) -> StageEstimate:
    """`lora-rlhf reward`: a sequence classifier (no LM head) on the distinct sequences of `batch` pairs
    (`reward_sequences`: K-wise rankings repeat responses, which are forwarded once, so they need fewer)."""
    rows = reward_sequences(batch, responses_per_prompt)
    tokens = rows * max_length
    acts = activation_bytes(shape, base, rows, max_length)
    transient = backward_churn(shape, base, rows, max_length) + layer_workspace(shape, base, tokens)
    transient = int(CPU_REWARD_SLACK * transient)
    train = _phase(base, "train", [*_resident(shape, base, {"reward": True}, lm_head=False),
                            Part("activations", acts, _act_note(base, rows, max_length)),
                            Part("backward workspace", layer_workspace(shape, base, tokens)),
                            *heap_slack(base, transient)])
    return StageEstimate("reward", [_load_phase(shape, base, lm_head=False), train],
                         {"micro_batch_pairs": batch, "sequences": rows, "max_length": max_length})


def dpo_estimate(shape: ModelShape, base: Base, batch: int, max_length: int) -> StageEstimate:
    """`lora-rlhf dpo`: TRL's DPOTrainer on one base with the policy (trainable) and reference (frozen) adapters.

    Each step forwards the chosen and the rejected sequence of `batch` pairs (2 x batch rows) through the policy
    with grad, then through the reference without (its temporaries on top of the policy's saved activations), then
    backward. Log-probs come from TRL's fused LM head (FUSED_TILES tiles, no [rows, T, V] logits). The CPU heap
    slack is SFT's formula, not yet fitted on DPO runs (bench/bench_plan.py dpo-135m-4bit measures it).
    """
    rows = 2 * batch
    tokens = rows * max_length
    acts = activation_bytes(shape, base, rows, max_length)
    tile = min(tokens, FUSED_TILE_TOKENS) * min(shape.vocab_size, FUSED_TILE_VOCAB) * 4
    tiles = int(FUSED_TILES[base.device] * tile)
    hidden = tokens * shape.hidden_size * base.dtype_bytes
    transient = backward_churn(shape, base, rows, max_length) + layer_workspace(shape, base, tokens)
    train = Phase("train", [*_resident(shape, base, {"policy": True, "reference": False}),
                            Part("activations", acts, _act_note(base, rows, max_length) + ", chosen + rejected"),
                            Part("log-prob tiles", tiles + hidden,
                                 f"{FUSED_TILES[base.device]} x [{min(tokens, FUSED_TILE_TOKENS)}, "
                                 f"{min(shape.vocab_size, FUSED_TILE_VOCAB)}] fp32 + the final hidden states"),
                            Part("forward/backward workspace", layer_workspace(shape, base, tokens),
                                 "the reference's no-grad forward, then the backward"),
                            *heap_slack(base, transient)])
    return StageEstimate("dpo", [_load_phase(shape, base), train], {"micro_batch_pairs": batch, "sequences": rows,
                                                                     "max_length": max_length})


def generation_parts(shape: ModelShape, base: Base, rows: int, prompt_len: int, new_tokens: int,
                     keep_logits: bool, for_training: bool = False) -> list[Part]:
    """What sampling `rows` sequences adds: KV cache, (kept) logits, the CPU's dequantized weights, prefill.
    `for_training`: the base is prepared for training (PPO), so the cache and the stream are fp32."""
    width = stream_bytes(base, for_training)
    parts = [Part("kv cache", shape.kv_cache_bytes_per_token(width) * rows * (prompt_len + new_tokens),
                  f"{rows} rows x {prompt_len}+{new_tokens} tokens")]
    if keep_logits:
        parts.append(Part("generation logits", rows * new_tokens * shape.vocab_size * 4,
                          "fp32 [B, V] per new token, kept for the rollout log-probs"))
    else:
        parts.append(Part("step logits", 3 * rows * shape.vocab_size * 4, "fp32 [B, V] of the current token"))
    if base.device == "cpu" and base.quant == "4bit":
        parts.append(Part("dequantized weights", shape.linear_params() * base.dtype_bytes,
                          "CPU: 4-bit layers decoded once per generate call (core.generation)"))
    prefill = layer_workspace(shape, base, rows * prompt_len, for_training) + rows * prompt_len * shape.hidden_size * width
    parts.append(Part("prefill workspace", prefill, "one layer's temporaries over the prompts"))
    return parts


def generation_estimate(shape: ModelShape, base: Base, rows: int, prompt_len: int, new_tokens: int,
                        adapters: int = 1, stage: str = "compare") -> StageEstimate:
    """`compare` / `eval`: the base (not prepared for training) + frozen adapters, sampling `rows` at a time."""
    gen = generation_parts(shape, base, rows, prompt_len, new_tokens, keep_logits=False)
    roles = {f"adapter {i + 1}": False for i in range(adapters)}
    phase = _phase(base, "generate", [*_resident(shape, base, roles, for_training=False), *gen,
                               *heap_slack(base, sum(p.bytes for p in gen if p.name != "dequantized weights"))])
    return StageEstimate(stage, [_load_phase(shape, base, for_training=False), phase],
                         {"rows": rows, "prompt_length": prompt_len, "new_tokens": new_tokens})


def eval_estimate(shape: ModelShape, base: Base, rows: int, prompt_len: int, new_tokens: int, text_len: int,
                  adapters: int = 4) -> StageEstimate:
    """`eval`: generation as `compare` does it, then teacher-forced scoring (KL to the reference, RM scores,
    general-text perplexity) of `rows` sequences of up to `text_len` tokens at a time. The LM head runs one
    sequence at a time (stages/eval/evaluate.sequence_logprobs), so only one [T, V] block of logits exists."""
    est = generation_estimate(shape, base, rows, prompt_len, new_tokens, adapters=adapters, stage="eval")
    resident = _resident(shape, base, {f"adapter {i + 1}": False for i in range(adapters)}, for_training=False)
    tokens = rows * text_len
    hidden = tokens * shape.hidden_size * base.dtype_bytes
    work = layer_workspace(shape, base, tokens, for_training=False)
    logits = 2 * text_len * shape.vocab_size * 4
    est.phases.append(_phase(base, "score", [*resident,
                                      Part("hidden states", hidden, f"[{rows}, {text_len}, {shape.hidden_size}]"),
                                      Part("forward workspace", work, "one layer's temporaries"),
                                      Part("sequence logits", logits, f"fp32 [{text_len}, {shape.vocab_size}] of "
                                                                      "one sequence + its log-softmax"),
                                      *heap_slack(base, hidden + work)]))
    est.settings["text_length"] = text_len
    return est


@dataclass(frozen=True)
class PPOShape:
    """The PPO numbers memory depends on (recipe.ppo, resolved)."""

    batch_size: int
    forward_batch: int           # local_rollout_forward_batch_size, capped at batch_size
    micro_batch: int             # batch_size / num_mini_batches / gradient_accumulation_steps
    response_length: int
    prompt_length: int
    with_value: bool = True      # advantage_estimator gae
    reward_adapter: bool = True  # False with ppo.reward_fn
    reference_adapter: bool = True
    ptx_rows: int = 0            # ptx_batch_size when ptx_coef > 0
    ptx_length: int = 0
    backward_passes: int = 1     # policy backward passes over the run: steps x epochs x mini-batches x accumulation


def ppo_estimate(shape: ModelShape, base: Base, p: PPOShape, stage: str = "ppo") -> StageEstimate:
    """`lora-rlhf ppo`: four roles on one base; 1. roll out, 2. score, 5. optimise (stages/ppo/trainer.py)."""
    roles = {"policy": True}
    if p.reference_adapter:
        roles["reference"] = False
    if p.reward_adapter:
        roles["reward"] = False
    if p.with_value:
        roles["value"] = True
    resident = _resident(shape, base, roles)
    seq = p.prompt_length + p.response_length
    v, dt = shape.vocab_size, base.dtype_bytes
    buffers = Part("rollout buffers", p.batch_size * (seq * 8 * 3 + p.response_length * 4 * 8),
                   "ids, masks, log-probs, values, rewards, advantages")

    # 1. roll out: KV cache of one forward batch; on the CPU its kept logits (rollout.keeps_generation_logprobs: a
    # GPU recomputes the old log-probs in scoring) and the dequantized copy of the weights
    gen = generation_parts(shape, base, p.forward_batch, p.prompt_length, p.response_length,
                           keep_logits=base.device == "cpu", for_training=True)
    rollout = _phase(base, "rollout", [*resident, buffers, *gen,
                                *heap_slack(base, sum(x.bytes for x in gen if x.name != "dequantized weights"))])

    # 2. score: no-grad forwards of one forward batch; reference logits [b, R+1, V], /temperature, log-softmax rows
    b = p.forward_batch
    per = 1 if shape.plain_lm_head else b  # rows whose logits exist at once (rollout.response_logprobs)
    score_logits = per * (p.response_length + 1) * v * dt + per * p.response_length * v * max(dt, 4)
    score_work = layer_workspace(shape, base, b * seq)
    scoring = _phase(base, "scoring", [*resident, buffers,
                                Part("scoring logits", score_logits, f"reference [{per}, {p.response_length}+1, {v}] "
                                                                     "and its tempered copy"),
                                Part("forward workspace", score_work), *heap_slack(base, score_logits + score_work)])

    # 5. optimise: the policy's forward + backward (+ ptx on the same graph), then the value's
    m = p.micro_batch
    ppo_base = replace(base, gradient_checkpointing=base.gradient_checkpointing and PPO_CHECKPOINTS)
    acts = activation_bytes(shape, ppo_base, m, seq)
    churn = row_churn = backward_churn(shape, base, m, seq)
    work = layer_workspace(shape, base, m * seq)
    # tempered logits, their grad, the LM head output's grad, the fp32 copy the entropy statistic takes: of one
    # sequence where the LM head runs per sequence under checkpointing (rollout.response_logprobs), else the batch's
    rows = 1 if shape.plain_lm_head else m
    logits = 4 * rows * p.response_length * v * max(dt, 4)
    opt_parts = [Part("activations", acts, _act_note(ppo_base, m, seq)),
                 Part("logits", logits, f"[{rows}, {p.response_length}, {v}] tempered + 2 grads + entropy copy")]
    if p.ptx_rows:
        ptx_acts = activation_bytes(shape, ppo_base, p.ptx_rows, p.ptx_length)
        # measured (bench_plan ppo-ptx-135m-4bit-mb8): the ptx rows' backward reuses the heap the PPO rows' backward
        # freed (one graph, walked once), so the slack is that of the larger of the two, not of both
        churn = max(churn, backward_churn(shape, base, p.ptx_rows, p.ptx_length))
        ptx_logits = 3 * p.ptx_rows * p.ptx_length * v * 4
        opt_parts += [Part("ptx activations", ptx_acts, f"{p.ptx_rows} x {p.ptx_length} tokens, same graph"),
                      Part("ptx logits", ptx_logits, "LM loss over the ptx rows, fp32")]
    opt_parts.append(Part("backward workspace", work))
    # measured: a second backward pass fragments the heap more, whether it is the same step's (epochs x mini-batches
    # x accumulation) or the next step's (bench_plan ppo-135m-4bit-ckpt, ppo-ptx-135m-4bit-long: one pass per step,
    # two steps); two passes or more hold about twice the one-pass slack
    passes = min(2, p.backward_passes)
    scale = CPU_PPO_CHECKPOINTED_SLACK if ppo_base.gradient_checkpointing else 1.0
    opt_parts += heap_slack(base, int(scale * passes * (work + churn)))
    from_tokens, per_tokens = CPU_PPO_LONG_ROWS
    if base.device == "cpu" and seq > from_tokens:  # the PPO rows' activations and slack, without the ptx rows'
        rows_heap = acts + sum(x.bytes for x in heap_slack(base, int(scale * passes * (work + row_churn))))
        opt_parts.append(Part("long-row heap", int(rows_heap * (seq - from_tokens) / per_tokens),
                              f"CPU: {seq}-token rows hold more heap per token than {from_tokens}-token ones"))
    if base.device == "cpu" and rows < m:
        # measured: glibc keeps the per-sequence logits blocks it freed, about the batch's volume of them (a GPU's
        # caching allocator reuses one sequence's blocks)
        opt_parts.append(Part("per-sequence logits churn", 4 * m * p.response_length * v * 4,
                              "CPU: freed per-sequence logits glibc keeps"))
    if base.device == "cpu":
        # measured: the optimisation's temporaries first reuse the heap the rollout freed (dequantized weights,
        # kept logits); only what the rollout freed beyond them stays resident on top
        kept = sum(x.bytes for x in gen) - sum(x.bytes for x in opt_parts)
        if kept > 0:
            opt_parts.append(Part("rollout heap kept", kept, "CPU: freed by the rollout, beyond what is reused"))
    optimise = _phase(base, "optimisation", [*resident, buffers, *opt_parts])
    settings = {"batch_size": p.batch_size, "forward_batch": b, "micro_batch": m, "prompt_length": p.prompt_length,
                "response_length": p.response_length, "roles": list(roles)}
    return StageEstimate(stage, [_load_phase(shape, base), rollout, scoring, optimise], settings)


def _act_note(base: Base, rows: int, seq: int) -> str:
    how = "layer inputs only (gradient checkpointing)" if base.gradient_checkpointing else "every layer, for backward"
    return f"{rows} x {seq} tokens, {how}"


def with_base(base: Base, **changes: object) -> Base:
    return replace(base, **changes)
