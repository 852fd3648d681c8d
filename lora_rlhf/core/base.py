"""The shared base: ONE causal LM (loaded by core.loading, 4-bit NF4 by default) wrapped once as a `PeftModel`
holding named adapters, one per role:

    policy     trainable LoRA (PPO, SFT)
    reference  frozen SFT adapter, or the bare base (no adapter) when there was no SFT
    reward     frozen LoRA + scalar head
    value      trainable LoRA + scalar head

`SharedBase.use(role)` switches the active adapter. PEFT's `set_adapter` flips `requires_grad` (it makes only
the active adapter trainable); `use` re-applies our own trainable set afterwards, so switching between the
policy and value passes of one optimisation step keeps both trainable and never unfreezes reward/reference.
Each role's parameters are listed once when the role is registered, so a switch touches only adapter weights
(a few MB), never the walk over every base parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_rlhf.core.adapters import (
    ADAPTER_WEIGHTS,
    check_adapter_base,
    local_adapter_folder,
    role_kind,
    write_adapter_meta,
)
from lora_rlhf.core.heads import HEAD_FILE, ScalarHead
from lora_rlhf.core.io import remove_temp_files, writing
from lora_rlhf.core.loading import autocast_dtype, compute_dtype, load_base_model, lora_config
from lora_rlhf.core.models import PLAIN_LM_HEAD
from lora_rlhf.errors import ModelError
from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass
class SharedBase:
    """One base model, many named adapters. Build with `SharedBase.load(...)`."""

    model: Any  # the base causal LM, then the PeftModel wrapping it
    tokenizer: Any
    info: dict[str, Any]
    heads: dict[str, ScalarHead] = field(default_factory=dict)
    trainable: set[str] = field(default_factory=set)
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> adapter metadata
    _params: dict[str, list[nn.Parameter]] = field(default_factory=dict, repr=False)  # role -> its LoRA weights
    dtype: torch.dtype = torch.float32  # the compute dtype (core.loading.compute_dtype)

    @classmethod
    def load(cls, model_cfg: ModelConfig, quant: QuantizationConfig, for_training: bool = True,
             tokenizer: Any = None) -> SharedBase:
        """`tokenizer`: the model's, when the caller already loaded it (to size its preflight)."""
        model, tokenizer, info = load_base_model(model_cfg, quant, for_training, tokenizer)
        return cls(model=model, tokenizer=tokenizer, info=info, dtype=compute_dtype(model_cfg, model.device))

    # ---------------------------------------------------------------- adapters by role
    @property
    def is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """What `autocast` casts forwards to (None: no autocast): core.loading.autocast_dtype."""
        return autocast_dtype(self.device, self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forwards in the compute dtype on a GPU (PPO's own loop; see core.loading.autocast_dtype); a no-op
        elsewhere. Backward runs outside it."""
        target = self.autocast_dtype
        return contextlib.nullcontext() if target is None else torch.autocast(self.device.type, dtype=target)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def has(self, role: str) -> bool:
        return role in self.roles

    def add_adapter(self, role: str, settings: LoraSettings, trainable: bool = True) -> None:
        """A fresh LoRA adapter for `role`."""
        from peft import get_peft_model

        cfg = lora_config(settings)
        if self.is_peft:
            self.model.add_adapter(role, cfg)
        else:
            self.model = get_peft_model(self.model, cfg, adapter_name=role)
        self._register(role, trainable, {})

    def load_adapter(self, role: str, folder: str | Path, trainable: bool = False) -> dict[str, Any]:
        """Load a saved adapter folder as `role`, with its head when it has one (Hub references are resolved
        to folders by `lora_rlhf.hub.client.local_adapter` before they reach here)."""
        from peft import PeftModel
        from safetensors import SafetensorError

        folder = local_adapter_folder(folder)
        meta = check_adapter_base(folder, self.info)
        try:
            if self.is_peft:
                self.model.load_adapter(str(folder), adapter_name=role, is_trainable=trainable)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=role,
                                                       is_trainable=trainable)
        except SafetensorError as e:
            raise ModelError(f"'{folder / ADAPTER_WEIGHTS}' cannot be read ({e}): the file is damaged or was cut "
                             "short", fix="copy or download the adapter again, or re-run the stage that wrote it") from None
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            # An adapter without lora_rlhf.json (so no fingerprint to compare) trained on a base of another shape.
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), "")
            raise ModelError(f"adapter '{folder}' does not fit the loaded base '{self.info['name_or_path']}': its "
                             f"weights have other shapes ({first[:160]})",
                             fix="load it on the base it was trained on (model.name / --model), or use an adapter "
                                 "trained on this base") from None
        if (folder / HEAD_FILE).is_file():
            self.heads[role] = ScalarHead.load(folder, self.device)
        self._register(role, trainable, meta)
        return meta

    def copy_adapter(self, src: str, dst: str, trainable: bool = True) -> None:
        """Start `dst` as an exact copy of `src` (policy from SFT, value from reward), head included.

        Every LoRA tensor of `src` must find its counterpart in `dst`: a silent partial copy would start PPO
        from an adapter that is neither the SFT model nor a fresh one.
        """
        self.model.add_adapter(dst, self.model.peft_config[src])
        params = dict(self.model.named_parameters())
        sources = {n: p for n, p in params.items() if _adapter_of(n) == src}
        targets = {n: p for n, p in params.items() if _adapter_of(n) == dst}
        pairs = {n: _rename_adapter(n, src, dst) for n in sources}
        unmatched = sorted(n for n, t in pairs.items() if t not in targets)
        if not sources or unmatched or len(targets) != len(sources):
            raise ModelError(f"cannot copy adapter '{src}' to '{dst}': {len(sources)} source tensors, "
                             f"{len(targets)} target tensors, unmatched {unmatched[:3]}")
        with torch.no_grad():
            for name, target in pairs.items():
                targets[target].copy_(sources[name])
        if src in self.heads:
            head = ScalarHead(self.hidden_size).to(self.device)
            head.load_state_dict(self.heads[src].state_dict())
            self.heads[dst] = head
        self._register(dst, trainable, dict(self.roles.get(src, {})))

    def add_head(self, role: str) -> ScalarHead:
        self.heads[role] = ScalarHead(self.hidden_size).to(self.device)
        self._apply_trainable()
        return self.heads[role]

    def _register(self, role: str, trainable: bool, meta: dict[str, Any]) -> None:
        self.roles[role] = meta
        self._params = {}
        for name, p in self.model.named_parameters():  # once per new adapter, not per switch
            owner = _adapter_of(name)
            if owner is not None:
                self._params.setdefault(owner, []).append(p)
        if trainable:
            self.trainable.add(role)
        else:
            self.trainable.discard(role)
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        """requires_grad exactly for the LoRA weights and heads of trainable roles; everything else frozen.

        Base weights are frozen at load and PEFT's set_adapter never touches them, so only adapter weights
        need resetting after a switch.
        """
        for role, params in self._params.items():
            wanted = role in self.trainable
            for p in params:
                p.requires_grad_(wanted)
        for role, head in self.heads.items():
            head.requires_grad_(role in self.trainable)

    def keep_adapters_in_fp32(self) -> None:
        """Keep trainable LoRA weights in fp32, as PEFT itself does (`autocast_adapter_dtype`).

        TRL's trainers cast QLoRA adapters to bf16 (the QLoRA paper's GPU advice). bf16 weights lose small
        optimizer updates, PEFT reloads a saved adapter in fp32 (so it would no longer reproduce the training
        logits), and on the CPU bf16 matmuls are slow: measured 25 s/step with bf16 adapters vs ~1 s in fp32 on
        the 135M model (bench/bench_sft.py).
        """
        for params in self._params.values():
            for p in params:
                if p.dtype != torch.float32:
                    p.data = p.data.float()

    def trainable_parameters(self, role: str) -> list[nn.Parameter]:
        params = list(self._params.get(role, []))
        if role in self.heads:
            params += list(self.heads[role].parameters())
        return params

    @contextlib.contextmanager
    def use(self, role: str | None) -> Iterator[Any]:
        """Run the model as `role`. `None` (or `reference` without an adapter) means the bare base."""
        if role is None or (role == "reference" and role not in self.roles):
            if self.is_peft:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
            return
        if role not in self.roles:
            raise ModelError(f"no adapter is loaded for role '{role}' (loaded: {', '.join(self.roles) or 'none'})")
        if self.model.active_adapter != role:  # set_adapter walks every module: skip it when nothing changes
            self.model.set_adapter(role)
        self._apply_trainable()
        yield self.model

    def train(self, on: bool = True) -> None:
        """Training mode (dropout on) for the model and every head, or eval mode."""
        self.model.train(on)
        for head in self.heads.values():
            head.train(on)

    # ---------------------------------------------------------------- forward helpers
    def backbone(self) -> nn.Module:
        """The transformer stack without the LM head (LoRA layers inside it follow the active adapter)."""
        lm = self.model.get_base_model() if self.is_peft else self.model
        return getattr(lm, lm.base_model_prefix)

    def lm_head(self) -> nn.Module | None:
        """The output layer, where logits are exactly lm_head(backbone's last hidden state), so that a caller
        can run it on the positions it needs, a few at a time; None for other architectures (PLAIN_LM_HEAD)."""
        if getattr(self.model.config, "model_type", None) not in PLAIN_LM_HEAD:
            return None
        return self.model.get_output_embeddings()

    def scalar(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] -> per-token head outputs [B, T] of `role` (reward or value)."""
        with self.use(role):
            hidden = self.backbone()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.heads[role](hidden)

    def save_adapter(self, role: str, folder: str | Path, stage: str, **extra: Any) -> None:
        """Save `role` in plain PEFT format (+ head), tokenizer, and metadata last. A full disk is an OSError(ENOSPC)
        naming the file (core.io.writing); what an earlier save killed half-way left in `folder` is removed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_temp_files(folder)
        with writing(folder / "adapter_model.safetensors"):
            self.model.save_pretrained(str(folder), selected_adapters=[role])
        # PEFT nests non-default adapters in a subfolder; flatten so PeftModel.from_pretrained(base, folder) works.
        nested = folder / role
        if nested.is_dir():
            for f in nested.iterdir():
                f.replace(folder / f.name)
            nested.rmdir()
        head = self.heads.get(role)
        if head is not None:
            head.save(folder)
        with writing(folder / "tokenizer.json"):
            self.tokenizer.save_pretrained(str(folder))
        write_adapter_meta(folder, stage, role_kind(role), self.info, head, **extra)


def _adapter_of(param_name: str) -> str | None:
    """'...q_proj.lora_A.policy.weight' -> 'policy'; None for base weights."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _LORA_PARTS:
            return parts[i + 1]
    return None


def _rename_adapter(param_name: str, src: str, dst: str) -> str:
    """The same tensor's name in adapter `dst`: only the adapter segment after a LoRA part changes."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _LORA_PARTS and parts[i + 1] == src:
            parts[i + 1] = dst
    return ".".join(parts)
