"""Steps 1 and 2 of a PPO step: roll out responses with the policy, then score them with every role.

A batch of B episodes is stored as one tensor [B, Q + R]: the queries left padded to Q tokens, then the
responses right padded to R tokens. Every mask is built from lengths (queries: tokenised length; responses:
up to and including the first stop token), never from token identity: the pad token may also be generated,
and SmolLM2's end-of-turn token sits inside every chat prompt (see DESIGN.md). Position ids count real tokens
only, so a left-padded row sees the same positions as when it was generated. All four roles are adapters on
one SharedBase; `sb.use(role)` selects one.
"""

from __future__ import annotations

import numbers
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from lora_rlhf.core import distributed
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.generation import dequantized_for_decoding, sampling_as_given
from lora_rlhf.core.logprobs import entropy, token_logprobs
from lora_rlhf.core.text import pad, prompt_ids
from lora_rlhf.errors import DataError
from lora_rlhf.recipe.ppo import PPOSection

RewardFn = Callable[[list[Any], list[str]], list[float]]


@dataclass
class RewardSource:
    """Where scores come from: the `reward` role (adapter + head, minus its offset) or a Python function."""

    description: str
    fn: RewardFn | None = None
    offset: float = 0.0


@dataclass
class Batch:
    """B episodes. Tensors on the models' device; `None` fields are filled by `score`."""

    prompts: list[Any]
    query_responses: torch.Tensor  # [B, Q + R] token ids: left-padded query, right-padded response
    attention_mask: torch.Tensor   # [B, Q + R] 1 on real tokens
    context_length: int            # Q
    lengths: torch.Tensor          # [B] real response tokens (the stop token included), >= 1
    ended: torch.Tensor            # [B] bool: the response ended with the stop token
    texts: list[str]               # decoded responses (special tokens dropped)
    logprobs: torch.Tensor | None = None      # [B, R] policy log-probs of the sampled tokens (0 on padding)
    ref_logprobs: torch.Tensor | None = None  # [B, R] the same under the reference
    values: torch.Tensor | None = None        # [B, R] value before each response token (0 on padding)
    scores: torch.Tensor | None = None        # [B] reward (adapter output minus offset, or the function's)

    @property
    def responses(self) -> torch.Tensor:
        """[B, R] response token ids (pad after each response's end)."""
        return self.query_responses[:, self.context_length:]

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, R] 1.0 on real response tokens."""
        positions = torch.arange(self.responses.shape[1], device=self.lengths.device)
        return (positions.unsqueeze(0) < self.lengths.unsqueeze(1)).float()

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids(self.attention_mask)

    def select(self, index: torch.Tensor | slice) -> Batch:
        """The episodes at `index` (a micro-batch), sharing storage where possible."""
        idx = index.tolist() if isinstance(index, torch.Tensor) else list(range(len(self.prompts)))[index]
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                values[f.name] = v[index]
            elif isinstance(v, list):
                values[f.name] = [v[i] for i in idx]
        return replace(self, **values)

    def to(self, device: torch.device) -> Batch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def concat(batches: list[Batch], pad_id: int) -> Batch:
    """Several scored batches as one, in order (the ranks' shares of a step -> the global batch).

    Each share was padded to its own widths: queries are left-padded again to the longest query Q and
    responses right-padded to the longest R. Padding is masked out and position ids count real tokens, so
    every episode's forward is unchanged.
    """
    if len(batches) == 1:
        return batches[0]
    q = max(b.context_length for b in batches)
    r = max(b.responses.shape[1] for b in batches)

    def widen(b: Batch, t: torch.Tensor, value: float) -> torch.Tensor:  # [B, Q_b + R_b] -> [B, Q + R]
        return torch.nn.functional.pad(t, (q - b.context_length, r - b.responses.shape[1]), value=value)

    def right(t: torch.Tensor) -> torch.Tensor:  # [B, R_b] -> [B, R]
        return torch.nn.functional.pad(t, (0, r - t.shape[1]))

    return Batch(
        prompts=[p for b in batches for p in b.prompts],
        query_responses=torch.cat([widen(b, b.query_responses, pad_id) for b in batches]),
        attention_mask=torch.cat([widen(b, b.attention_mask, 0) for b in batches]),
        context_length=q,
        lengths=torch.cat([b.lengths for b in batches]),
        ended=torch.cat([b.ended for b in batches]),
        texts=[t for b in batches for t in b.texts],
        scores=torch.cat([b.scores for b in batches]) if batches[0].scores is not None else None,
        **{name: torch.cat([right(getattr(b, name)) for b in batches]) if getattr(batches[0], name) is not None
           else None for name in ("logprobs", "ref_logprobs", "values")},
    )


def gather(batch: Batch, pad_id: int) -> Batch:
    """The global batch on every rank: each rank's scored share, in rank order (a few KB per episode)."""
    if not distributed.launched():
        return batch
    device = batch.query_responses.device
    shares = distributed.gather_objects(batch.to(torch.device("cpu")))
    return concat(shares, pad_id).to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: 0, 1, 2, ... over real tokens (left padding does not shift positions)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def truncate_after_stop(responses: torch.Tensor, stop_id: int | None,
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token. [B, R] -> (responses [B, R], lengths [B], ended [B]).

    lengths count the stop token; tokens after it become `pad_id`. Without a stop token every response keeps
    all R tokens, whatever they are (a generated pad or end-of-turn token is then a real token).
    """
    batch, width = responses.shape
    if stop_id is None:
        lengths = torch.full((batch,), width, dtype=torch.long, device=responses.device)
        return responses, lengths, torch.zeros(batch, dtype=torch.bool, device=responses.device)
    is_stop = responses == stop_id
    ended = is_stop.any(dim=1)
    first_stop = torch.where(ended, is_stop.float().argmax(dim=1), torch.full_like(ended, width - 1, dtype=torch.long))
    lengths = first_stop + 1
    positions = torch.arange(width, device=responses.device).unsqueeze(0)
    return responses.masked_fill(positions >= lengths.unsqueeze(1), pad_id), lengths, ended


def generation_config(cfg: PPOSection, stop_id: int | None, pad_id: int):
    from transformers import GenerationConfig

    # transformers fills unset fields from the model's defaults: an explicit top_k=0 turns its default 50 off,
    # and an empty eos list (not None) really disables stopping.
    return GenerationConfig(max_new_tokens=cfg.response_length, do_sample=True, temperature=cfg.temperature,
                            top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=[] if stop_id is None else stop_id,
                            pad_token_id=pad_id, use_cache=True)


def keeps_generation_logprobs(device: torch.device) -> bool:
    """Whether the rollout's old log-probs are taken from the logits generation computed (True on the CPU), or
    recomputed by scoring with the forward the policy loss runs (`response_logprobs`; on GPUs).

    On the CPU decoding does the training forward's arithmetic (core.generation.dequantized_for_decoding: the same
    `F.linear` on the same numbers), so generation's logits give the first step's ratio 1 to 1e-4 (tested) and save
    a policy forward per chunk. On a GPU decoding runs bitsandbytes' inference kernels over a KV cache, in 16 bits
    under autocast: the old log-probs would differ from the training forward's and the first ratio would not be
    1, nor the first KL 0. One no-grad policy forward per chunk is cheap next to decoding there, and generation then
    keeps no [R, B, V] logits (2 GB at 16 x 256 tokens of Llama 3's vocabulary). What remains is bitsandbytes'
    kernel choice: forwards without gradient take its 4-bit GEMM for up to 1536 rows, the training forward
    dequantizes; tests/test_gpu_paths.py measures that gap under LORA_RLHF_TEST_DEVICE=cuda.
    """
    return device.type == "cpu"


def stop_token_id(sb: SharedBase, cfg: PPOSection) -> int | None:
    """The token that ends a response (`ppo.stop_token: eos`), or None when responses always run R tokens."""
    return sb.tokenizer.eos_token_id if cfg.stop_token == "eos" else None


@torch.no_grad()
def generate(sb: SharedBase, prompts: list[Any], cfg: PPOSection) -> Batch:
    """Step 1: sample one response per prompt from the policy, with the KV cache, in the compute dtype; on the CPU
    keep the sampled tokens' log-probs (`keeps_generation_logprobs`; elsewhere scoring computes them)."""
    tokenizer, device = sb.tokenizer, sb.device
    pad_id = tokenizer.pad_token_id
    stop = stop_token_id(sb, cfg)
    query, query_mask = pad([prompt_ids(tokenizer, p) for p in prompts], pad_id, "left", device)
    gen_cfg = generation_config(cfg, stop, pad_id)
    keep = keeps_generation_logprobs(device)
    chunks, chunk_logprobs = [], []
    with (sb.use("policy") as model, dequantized_for_decoding(model), sampling_as_given(model), sb.autocast()):
        for start in range(0, len(prompts), cfg.local_rollout_forward_batch_size):
            rows = slice(start, start + cfg.local_rollout_forward_batch_size)
            tokens, logprobs = _sample_chunk(model, query[rows], query_mask[rows], gen_cfg, cfg.temperature, keep)
            chunks.append(tokens)
            chunk_logprobs.append(logprobs)
    width = max(c.shape[1] for c in chunks)
    raw = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks])
    responses, lengths, ended = truncate_after_stop(raw, stop, pad_id)
    response_mask = (torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
    logprobs = None
    if keep:
        logprobs = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunk_logprobs])
        logprobs = logprobs * response_mask
    texts = tokenizer.batch_decode([r[:n] for r, n in zip(responses.tolist(), lengths.tolist(), strict=True)],
                                   skip_special_tokens=True)
    return Batch(prompts=list(prompts), query_responses=torch.cat([query, responses], 1),
                 attention_mask=torch.cat([query_mask, response_mask], 1), context_length=query.shape[1],
                 lengths=lengths, ended=ended, texts=texts, logprobs=logprobs)


def _sample_chunk(model: Any, ids: torch.Tensor, mask: torch.Tensor, gen_cfg: Any, temperature: float,
                  keep_logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: sampled tokens [b, R] and, with keep_logprobs, their log-probs [b, R]. A function of its own so
    the generation output (R x [b, V] logits) is freed when it returns: held by the loop, it stayed alive while
    the next chunk generated, two chunks' logits at once."""
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, output_logits=keep_logprobs,
                         return_dict_in_generate=True)
    tokens = out.sequences[:, ids.shape[1]:]
    return tokens, sampled_logprobs(out.logits, tokens, temperature) if keep_logprobs else None


def sampled_logprobs(step_logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the sampled tokens from the logits generation already computed: R x [B, V], [B, R] -> [B, R].

    These are the policy's "old" log-probs: reusing them saves scoring a full policy forward (as TRL's
    PPOTrainer did). The price is that generation keeps R rows of [B, V] logits per rollout chunk (the size of
    a chunk's logits, as in TRL; `local_rollout_forward_batch_size` bounds it); the log-softmax then runs one
    step at a time, so no second copy of that size is made.
    """
    return torch.stack([token_logprobs(logits.float() / temperature, tokens[:, t])
                        for t, logits in enumerate(step_logits)], dim=1)


def response_logits(model: Any, batch: Batch) -> torch.Tensor:
    """Logits predicting each response token: [B, R, V] (only these positions go through the LM head)."""
    width = batch.responses.shape[1]
    out = model(input_ids=batch.query_responses, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=width + 1, use_cache=False)
    return out.logits[:, :-1]


def response_logprobs(sb: SharedBase, batch: Batch, temperature: float,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Under the active adapter: log-probs of the sampled tokens at the sampling temperature [B, R] (padding
    positions 0, so they add nothing to sums and ratios there are exactly 1), and with_entropy the policy's
    entropy at each response position [B, R] (a statistic: no gradient).

    The LM head runs one sequence at a time, under activation checkpointing when gradients are on: only one
    sequence's [R, V] logits exist at once, never the batch's [B, R, V] with its tempered copy and their
    gradients (0.3 GB at 8 x 48 tokens of SmolLM2's 49k vocabulary, 4 GB at 8 x 256 tokens of Llama 3's 128k).
    The price is one more LM-head matmul over the response tokens in backward.
    """
    head = sb.lm_head()
    if head is None:  # logits transformed after the head: the model's own forward, whole batch at once
        logits = response_logits(sb.model, batch) / temperature
        ent = entropy(logits.detach()) if with_entropy else None
        return token_logprobs(logits, batch.responses) * batch.response_mask, ent
    width = batch.responses.shape[1]
    hidden = sb.backbone()(input_ids=batch.query_responses, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).last_hidden_state[:, -width - 1:-1]
    rows = []
    for h, tokens in zip(hidden, batch.responses, strict=True):
        if torch.is_grad_enabled():
            rows.append(checkpoint(_sequence_logprobs, head, h, tokens, temperature, with_entropy,
                                   use_reentrant=False))
        else:
            rows.append(_sequence_logprobs(head, h, tokens, temperature, with_entropy))
    logprobs = torch.stack([r[0] for r in rows]) * batch.response_mask
    return logprobs, torch.stack([r[1] for r in rows]) if with_entropy else None


def _sequence_logprobs(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                       with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [R, H], tokens [R] -> (log-probs [R], entropy [R], or an empty tensor without with_entropy)."""
    logits = head(hidden).float() / temperature
    logprobs = token_logprobs(logits, tokens)
    with torch.no_grad():
        ent = entropy(logits) if with_entropy else logits.new_empty(0)
    return logprobs, ent


def hidden_states(sb: SharedBase, role: str, batch: Batch) -> torch.Tensor:
    """Last hidden states [B, Q + R, H] of the backbone with `role`'s adapter active."""
    with sb.use(role):
        return sb.backbone()(input_ids=batch.query_responses, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False).last_hidden_state


def response_values(sb: SharedBase, batch: Batch, role: str = "value") -> torch.Tensor:
    """V(s_t) for every response position: the head on the state before each token. [B, R], 0 on padding."""
    hidden = hidden_states(sb, role, batch)
    values = sb.heads[role](hidden[:, batch.context_length - 1:-1])
    return values * batch.response_mask


def reward_model_scores(sb: SharedBase, batch: Batch, offset: float, stop_id: int | None = None) -> torch.Tensor:
    """The reward head at each episode's last real token, minus the reward offset. [B].

    A response cut at R tokens before its stop token is read with `stop_id` appended: the reward model learned
    from comparisons whose responses, cut at the same length, always close with it (core.text.encode, as eval
    scores too), and its head has never been trained to read a state in the middle of an answer. Scored there,
    a cut rollout gets an arbitrary score that PPO learns to chase by not ending its answers.
    """
    ids, mask, last = batch.query_responses, batch.attention_mask, batch.context_length + batch.lengths - 1
    cut = ~batch.ended
    if stop_id is not None and bool(cut.any()):
        ids = torch.nn.functional.pad(ids, (0, 1), value=stop_id)
        mask = torch.nn.functional.pad(mask, (0, 1))
        last = torch.where(cut, last + 1, last)
        rows = cut.nonzero().squeeze(1)
        ids[rows, last[rows]] = stop_id
        mask[rows, last[rows]] = 1
    hidden = hidden_states(sb, "reward", replace(batch, query_responses=ids, attention_mask=mask))
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return sb.heads["reward"](hidden[rows, last]) - offset


@torch.no_grad()
def score(sb: SharedBase, batch: Batch, reward: RewardSource, cfg: PPOSection) -> Batch:
    """Step 2: reference log-probs, values and scores for every episode (chunked forwards in the compute dtype);
    the policy's log-probs too when the batch does not already carry them from generation."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "scores": []}
    n = len(batch.prompts)
    for start in range(0, n, cfg.local_rollout_forward_batch_size):
        chunk = batch.select(slice(start, start + cfg.local_rollout_forward_batch_size))
        with sb.autocast():
            if batch.logprobs is None:  # on the CPU generation gave them (see `keeps_generation_logprobs`)
                with sb.use("policy"):
                    parts["logprobs"].append(response_logprobs(sb, chunk, cfg.temperature)[0])
            with sb.use("reference"):
                parts["ref_logprobs"].append(response_logprobs(sb, chunk, cfg.temperature)[0])
            # No value role (rloo/grpo): zeros keep the batch's shape; nothing reads them.
            parts["values"].append(response_values(sb, chunk) if sb.has("value")
                                   else torch.zeros_like(chunk.response_mask))
            if reward.fn is None:
                parts["scores"].append(reward_model_scores(sb, chunk, reward.offset, stop_token_id(sb, cfg)))
    if reward.fn is not None:
        parts["scores"].append(function_scores(reward, batch))
    return replace(batch, **{k: torch.cat(v).float() for k, v in parts.items() if v})


def function_scores(reward: RewardSource, batch: Batch) -> torch.Tensor:
    """Call the user's reward function on (prompts, decoded responses); check it returned one number each.

    Its own error becomes one line saying where it was raised (the function is the user's code, not ours); a
    string such as "1.5" is refused rather than converted, since it usually means a parsing bug upstream.
    """
    try:
        result = reward.fn(list(batch.prompts), list(batch.texts))
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise DataError(f"reward function {reward.description} raised {type(e).__name__}: {e} "
                        f"(at {where.filename}:{where.lineno})",
                        fix="fix the function; test it alone on a few prompts and responses") from e
    # A list or tuple of numbers, or an array/tensor of them (its tolist() gives Python numbers).
    items = result.tolist() if hasattr(result, "tolist") else list(result) if isinstance(result, (list, tuple)) else None
    if items is None or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in items):
        raise DataError(f"reward function {reward.description} must return a list of numbers, got {str(result)[:80]}",
                        fix="return one float per response (a number, not a string)")
    values = [float(x) for x in items]
    if len(values) != len(batch.texts):
        raise DataError(f"reward function {reward.description} returned {len(values)} scores for "
                        f"{len(batch.texts)} responses", fix="return exactly one float per response")
    return torch.tensor(values, dtype=torch.float32, device=batch.lengths.device)
