"""The shared base: the only place that loads a base model.

One `AutoModelForCausalLM` is loaded once (4-bit NF4 by default) and wrapped once as a `PeftModel` holding
named adapters, one per role:

    policy     trainable LoRA (PPO, SFT)
    reference  frozen SFT adapter, or the bare base (no adapter) when there was no SFT
    reward     frozen LoRA + scalar head
    value      trainable LoRA + scalar head

`SharedBase.use(role)` switches the active adapter. PEFT's `set_adapter` flips `requires_grad` (it makes only
the active adapter trainable); `use` re-applies our own trainable set afterwards, so switching between the
policy and value passes of one optimisation step keeps both trainable and never unfreezes reward/reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_rlhf import __version__
from lora_rlhf.config import LoraSettings, ModelConfig, QuantizationConfig
from lora_rlhf.errors import ModelError
from lora_rlhf.heads import HEAD_FILE, ScalarHead
from lora_rlhf.models import hub_load_error, resolve_model

ROLES = ("policy", "reference", "reward", "value")
META_FILE = "lora_rlhf.json"
# Config fields that decide whether an adapter's weight shapes fit a base.
_FINGERPRINT_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim")


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA GPU is visible",
                         fix="set model.device: auto (or cpu), or check the NVIDIA driver / CUDA_VISIBLE_DEVICES")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        # On the CPU fp32 is both faster and exact; bf16 where the GPU supports it.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]


def base_fingerprint(config: Any) -> str:
    """A short hash of the base config's shape fields: equal fingerprints mean adapters are interchangeable."""
    shape = {k: getattr(config, k, None) for k in _FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # A pad equal to the end-of-turn token makes "not padding" masks hide real separators; prefer a
        # distinct token the vocabulary already has (no embedding resize).
        for candidate in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", tokenizer.unk_token):
            if candidate and candidate != tokenizer.eos_token and candidate in tokenizer.get_vocab():
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(q: QuantizationConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if q.mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                  bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=dtype)
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(model_cfg: ModelConfig, quant: QuantizationConfig, for_training: bool = True):
    """Load the base causal LM and its tokenizer. Returns (model, tokenizer, info)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model_cfg.name)
    device = resolve_device(model_cfg)
    dtype = compute_dtype(model_cfg, device)
    try:
        tokenizer = load_tokenizer(path, model_cfg.revision, model_cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=model_cfg.revision, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
            quantization_config=quantization_config(quant, dtype), device_map={"": str(device)},
        )
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise ModelError(f"cannot load the model folder '{path}': {e}") from e
        raise hub_load_error(model_cfg.name, e) from e
    disable_cpu_weight_repacking(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if for_training and quant.mode != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
    elif for_training and model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if device.type == "cpu" and quant.mode != "none":
        release_checkpoint_file(model)
        return_freed_heap()
    for p in model.parameters():
        p.requires_grad_(False)
    info = {"name_or_path": model_cfg.name, "revision": model_cfg.revision,
            "fingerprint": base_fingerprint(model.config), "quantization": quant.mode}
    return model, tokenizer, info


def release_checkpoint_file(model: nn.Module) -> None:
    """Give the unquantized weights of a quantized CPU model their own memory, so the checkpoint can be unmapped.

    On the CPU transformers memory-maps the safetensors file and leaves embeddings and norms as views into it;
    that keeps the whole file mapped, and every page read while quantizing stays resident in the process. Copying
    these few tensors frees the mapping: the 135M base then holds ~0.8 GB instead of ~1.1 GB of RSS.
    """
    with torch.no_grad():
        for module in model.modules():
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for _, t in tensors:
                if t.is_floating_point():  # quantized weights are uint8/int8 and already own their memory
                    t.data = t.data.clone()


def return_freed_heap() -> None:
    """Hand the heap freed by CPU quantization back to the OS (glibc keeps it otherwise).

    Quantizing on the CPU allocates and frees an fp32 copy of every weight; glibc keeps those pages in the heap,
    so the 4-bit 135M base held more resident memory after loading than the fp32 one. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: no malloc_trim
        pass


def disable_cpu_weight_repacking(model: nn.Module) -> None:
    """Keep one numeric path for 4-bit layers on CPUs with AVX512-BF16.

    There bitsandbytes repacks a layer's weights in place the first time it runs in eval mode without grad, and
    then computes differently from the training path: PPO's rollout log-probs would not match its training
    forward (ratio != 1 before any update), saved adapters would not reproduce logits, and the "frozen" base
    weights would change bytes. GPUs are unaffected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, bias=settings.bias, task_type="CAUSAL_LM")


def read_adapter_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_adapter_base(folder: str | Path, base_info: dict[str, Any]) -> dict[str, Any]:
    """Refuse an adapter recorded as trained on another base; return its metadata."""
    meta = read_adapter_meta(folder)
    recorded = meta.get("base", {})
    if recorded.get("fingerprint") and recorded["fingerprint"] != base_info["fingerprint"]:
        raise ModelError(
            f"adapter '{folder}' was trained on base '{recorded.get('name_or_path')}' "
            f"(fingerprint {recorded['fingerprint']}), but the loaded base is '{base_info['name_or_path']}' "
            f"(fingerprint {base_info['fingerprint']}): its weights do not fit",
            fix=f"set model.name to '{recorded.get('name_or_path')}', or use an adapter trained on this base",
        )
    return meta


def write_adapter_meta(folder: str | Path, stage: str, role: str, base_info: dict[str, Any],
                       head: ScalarHead | None = None, **extra: Any) -> None:
    """Write lora_rlhf.json last and atomically: its presence marks the folder complete."""
    meta = {"format_version": 1, "stage": stage, "role": role,
            "base": {k: base_info[k] for k in ("name_or_path", "revision", "fingerprint")},
            "quantization": base_info["quantization"],
            "head": {"file": HEAD_FILE, "hidden_size": head.hidden_size} if head is not None else None,
            "lora_rlhf_version": __version__, **extra}
    tmp = Path(folder) / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(Path(folder) / META_FILE)


@dataclass
class SharedBase:
    """One base model, many named adapters. Build with `SharedBase.load(...)`."""

    model: Any  # the base causal LM, then the PeftModel wrapping it
    tokenizer: Any
    info: dict[str, Any]
    heads: dict[str, ScalarHead] = field(default_factory=dict)
    trainable: set[str] = field(default_factory=set)
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> adapter metadata

    @classmethod
    def load(cls, model_cfg: ModelConfig, quant: QuantizationConfig, for_training: bool = True) -> SharedBase:
        model, tokenizer, info = load_base_model(model_cfg, quant, for_training)
        return cls(model=model, tokenizer=tokenizer, info=info)

    # ---------------------------------------------------------------- adapters by role
    @property
    def is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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

    def load_adapter(self, role: str, source: str | Path, trainable: bool = False) -> dict[str, Any]:
        """Load a saved adapter (folder or Hub id) as `role`, with its head when it has one."""
        from peft import PeftModel

        folder = resolve_adapter(source)
        meta = check_adapter_base(folder, self.info)
        if self.is_peft:
            self.model.load_adapter(str(folder), adapter_name=role, is_trainable=trainable)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=role, is_trainable=trainable)
        if (Path(folder) / HEAD_FILE).is_file():
            self.heads[role] = ScalarHead.load(folder, self.device)
        self._register(role, trainable, meta)
        return meta

    def copy_adapter(self, src: str, dst: str, trainable: bool = True) -> None:
        """Start `dst` as an exact copy of `src` (policy from SFT, value from reward), head included."""
        peft_cfg = self.model.peft_config[src]
        self.model.add_adapter(dst, peft_cfg)
        state = {k: v for k, v in self.model.state_dict().items() if f".{src}." in k}
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for key, value in state.items():
                target = key.replace(f".{src}.", f".{dst}.")
                if target in params:
                    params[target].copy_(value)
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
        if trainable:
            self.trainable.add(role)
        else:
            self.trainable.discard(role)
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        """requires_grad exactly for the LoRA weights and heads of trainable roles; everything else frozen."""
        for name, p in self.model.named_parameters():
            role = _adapter_of(name)
            p.requires_grad_(role is not None and role in self.trainable)
        for role, head in self.heads.items():
            head.requires_grad_(role in self.trainable)

    def keep_adapters_in_fp32(self) -> None:
        """Keep trainable LoRA weights in fp32, as PEFT itself does (`autocast_adapter_dtype`).

        TRL's trainers cast QLoRA adapters to bf16 (the QLoRA paper's GPU advice). bf16 weights lose small
        optimizer updates, PEFT reloads a saved adapter in fp32 (so it would no longer reproduce the training
        logits), and on the CPU bf16 matmuls are slow: measured 25 s/step with bf16 adapters vs ~1 s in fp32 on
        the 135M model (bench/bench_sft.py).
        """
        for name, p in self.model.named_parameters():
            if _adapter_of(name) is not None and p.dtype != torch.float32:
                p.data = p.data.float()

    def trainable_parameters(self, role: str) -> list[nn.Parameter]:
        params = [p for n, p in self.model.named_parameters() if _adapter_of(n) == role]
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
        self.model.set_adapter(role)
        self._apply_trainable()
        yield self.model

    # ---------------------------------------------------------------- forward helpers
    def backbone(self) -> nn.Module:
        """The transformer stack without the LM head (LoRA layers inside it follow the active adapter)."""
        lm = self.model.get_base_model() if self.is_peft else self.model
        return getattr(lm, lm.base_model_prefix)

    def scalar(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] -> per-token head outputs [B, T] of `role` (reward or value)."""
        with self.use(role):
            hidden = self.backbone()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.heads[role](hidden)

    def save_adapter(self, role: str, folder: str | Path, stage: str, **extra: Any) -> None:
        """Save `role` in plain PEFT format (+ head), tokenizer, and metadata last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
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
        self.tokenizer.save_pretrained(str(folder))
        write_adapter_meta(folder, stage, role_kind(role), self.info, head, **extra)


def role_kind(role: str) -> str:
    return role if role in ROLES else "policy"


def _adapter_of(param_name: str) -> str | None:
    """'...q_proj.lora_A.policy.weight' -> 'policy'; None for base weights."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            return parts[i + 1]
    return None


def resolve_adapter(source: str | Path) -> Path:
    """An adapter folder, or a Hub id downloaded (safetensors only) into the cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"'{source}' holds no adapter_config.json, so it is not a PEFT adapter folder",
                             fix="point at the output folder of `lora-rlhf sft`/`reward`/`ppo` (e.g. runs/x/sft)")
        return path
    from lora_rlhf.hub import download_adapter, split_ref

    repo_id = split_ref(str(source))[0]  # only the repo id: a revision ("feature/x") may hold slashes
    if str(source).startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise ModelError(f"adapter folder '{source}' does not exist",
                         fix="check the path; run the stage that writes it first")

    return download_adapter(str(source))
