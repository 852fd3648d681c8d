"""Scalar heads for the reward and value roles.

A head is a `Linear(hidden, 1)` applied to the backbone's last hidden states. It lives outside the PEFT model
(the causal LM has no `score` module to hold it) and is saved as `head.safetensors` with tensors `weight`
[1, hidden] and `bias` [1] (see docs/FORMATS.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_rlhf.core.io import writing

HEAD_FILE = "head.safetensors"


class ScalarHead(nn.Module):
    """hidden states [..., hidden] -> scalars [...]. Kept in fp32: it is tiny and bf16 scores lose ranking."""

    def __init__(self, hidden_size: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=bias, dtype=torch.float32)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        if bias:
            nn.init.zeros_(self.linear.bias)

    @property
    def hidden_size(self) -> int:
        return self.linear.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # fp32 under autocast too (PPO's forwards autocast on a GPU): a 16-bit score keeps ~3 significant digits
        with torch.autocast(hidden.device.type, enabled=False):
            return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def save(self, folder: str | Path) -> None:
        tensors = {"weight": self.linear.weight.detach().cpu().contiguous()}
        tensors["bias"] = (
            self.linear.bias.detach().cpu().contiguous() if self.linear.bias is not None else torch.zeros(1)
        )
        with writing(Path(folder) / HEAD_FILE):  # safetensors' full-disk error has no errno
            save_file(tensors, str(Path(folder) / HEAD_FILE))

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> ScalarHead:
        tensors = load_file(str(Path(folder) / HEAD_FILE))
        head = cls(tensors["weight"].shape[-1])
        head.linear.weight.data.copy_(tensors["weight"].reshape(1, -1))
        head.linear.bias.data.copy_(tensors["bias"].reshape(1))
        return head.to(device)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> ScalarHead:
        """Copy a trained `score` layer of a sequence-classification model (no bias there)."""
        head = cls(linear.in_features)
        head.linear.weight.data.copy_(linear.weight.detach().float().reshape(1, -1))
        if linear.bias is not None:
            head.linear.bias.data.copy_(linear.bias.detach().float().reshape(1))
        return head.to(linear.weight.device)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, T] (right padded) -> index of each row's last real token [B].

    Built from lengths, never from token identity: a pad token that also appears inside the text (SmolLM2's
    <|im_end|>) must not end the sequence early.
    """
    return attention_mask.long().sum(dim=-1).clamp(min=1) - 1


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] -> values at each row's last real token [B]."""
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)
