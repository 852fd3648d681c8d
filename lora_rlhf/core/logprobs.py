"""Log-probabilities and entropy from logits: one implementation, the same on every device.

TRL 1.16's `selective_log_softmax` and `entropy_from_logits` send CUDA tensors to Triton kernels when Triton is
installed, so the log-prob code the CPU tests pin would not be the code a GPU runs, and a GPU host would need a C
compiler for Triton's first call. These are TRL's own torch paths for fp32 logits, kept here for every device: the
callers run the LM head one sequence at a time ([R, V] logits), where a fused kernel saves little memory, and the
planner counts exactly these copies (lora_rlhf.plan.estimate). Logits are taken in fp32 whatever their dtype.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: logits [..., V], tokens [...] -> [...] (fp32, differentiable).

    One logsumexp per leading row, never a full [..., V] log-softmax copy (TRL's fp32 path).
    """
    logits = logits.float()
    picked = torch.gather(logits, dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)
    if logits.dim() == 1:
        return picked - torch.logsumexp(logits, dim=-1)
    return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def entropy(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Shannon entropy in nats of softmax(logits): [..., V] -> [...] (fp32), `chunk_size` rows at a time."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size):
        logp = torch.log_softmax(chunk, dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])
