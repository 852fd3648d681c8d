"""Merge a LoRA adapter into a full-precision copy of its base and save a plain transformers model folder.

    W' = W + (alpha / r) * B @ A      for every adapted linear layer (PEFT's merge_and_unload)

The base is loaded unquantized in the requested dtype (bf16/fp16/fp32) even when the adapter was trained on a
4-bit base (QLoRA): that is the usual way to ship a QLoRA model, and the merged weights then differ from the
training forward pass only by the NF4 rounding of W. Merging *into* 4-bit weights is refused: the update is
small next to W, so re-quantizing W + BA to 16 levels per block erases most of it, and a bitsandbytes 4-bit
checkpoint is not a model that other engines serve.

Reward and value adapters carry a scalar head outside the causal LM. They are exported as a
`...ForSequenceClassification` model (num_labels=1) whose `score` layer is the head's weight; such layers have
no bias, so the head's bias minus the reward offset is stored in the config as `lora_rlhf_score_shift`
(add it to the logit to get lora-rlhf's reward; rankings do not change). `head.safetensors` is kept alongside.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_rlhf.core.adapters import base_fingerprint, check_adapter_base, read_adapter_meta
from lora_rlhf.core.heads import HEAD_FILE, ScalarHead
from lora_rlhf.core.io import atomic_folder
from lora_rlhf.core.loading import load_config, load_pretrained
from lora_rlhf.core.models import resolve_model
from lora_rlhf.errors import ModelError
from lora_rlhf.hub.card import merged_card
from lora_rlhf.hub.client import base_license, local_adapter
from lora_rlhf.recipe.config import ModelConfig, QuantizationConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_QUANTIZED = ("4bit", "4-bit", "int4", "nf4", "fp4", "8bit", "8-bit", "int8", "gptq", "awq")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class MergeResult:
    out_dir: Path
    base: str
    dtype: str
    kind: str  # "causal-lm" or "sequence-classification"
    notes: list[str] = field(default_factory=list)


def check_dtype(dtype: str) -> torch.dtype:
    key = dtype.lower()
    if key in _QUANTIZED:
        raise ModelError(
            f"cannot merge into {dtype} weights: a LoRA update is small next to the base weights, so adding it and "
            "re-quantizing to a few bits rounds most of it away, and a bitsandbytes-quantized checkpoint is not a "
            "model other engines can serve",
            fix="merge into bf16 (--dtype bf16, or fp16/fp32), then quantize the merged model for serving "
                "(BitsAndBytesConfig at load time, GPTQ, AWQ, GGUF...)")
    if key not in DTYPES:
        raise ModelError(f"--dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    return DTYPES[key]


def merge_adapter(adapter: str | Path, out_dir: str | Path, *, dtype: str = "bf16", model: str | None = None,
                  revision: str | None = None, trust_remote_code: bool = False) -> MergeResult:
    """Merge `adapter` (folder or Hub reference) into its base; write a model folder to `out_dir`."""
    torch_dtype = check_dtype(dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelError(f"'{out_dir}' already exists and is not empty", fix="choose a new folder, or delete it")
    folder = local_adapter(adapter)
    meta = read_adapter_meta(folder)
    recorded = meta.get("base", {})
    if model is None and not recorded.get("name_or_path"):
        raise ModelError(f"'{adapter}' has no lora_rlhf.json naming its base model",
                         fix="pass the base with --model NAME (a Hub id or a local model folder)")
    name = model or recorded["name_or_path"]
    revision = revision or (recorded.get("revision") if model is None else None)
    base_cfg = ModelConfig(name=name, revision=revision, dtype=dtype.lower(), device="cpu",
                           trust_remote_code=trust_remote_code)
    path = resolve_model(name)
    config = load_config(base_cfg)
    # Cheap checks first (config only): a quantized checkpoint, or a base of another shape.
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", quant)
        raise ModelError(
            f"the base '{name}' is stored quantized ({method}): merging a LoRA update into quantized weights "
            "loses most of it and does not give a standard full-precision model",
            fix="pass the original unquantized base with --model (the one the quantized copy was made from)")
    check_adapter_base(folder, {"name_or_path": name, "fingerprint": base_fingerprint(config)})

    notes = []
    if meta.get("quantization") in ("4bit", "8bit"):
        notes.append(f"the adapter was trained on a {meta['quantization']} base and is merged into the "
                     f"{dtype} base: outputs differ slightly from training (the base's rounding), as with any "
                     "QLoRA merge")
    merged = _merged_causal_lm(base_cfg, folder)
    head_note = None
    kind = "causal-lm"
    if meta.get("head"):
        merged, shift = _as_sequence_classifier(merged, config, ScalarHead.load(folder), meta, torch_dtype)
        kind = "sequence-classification"
        head_note = (f"This is a {meta.get('role')} model exported for sequence classification (num_labels=1): "
                     f"add `config.lora_rlhf_score_shift` ({shift:.6g}) to the logit to get lora-rlhf's score.")
        notes.append(f"{meta.get('role')} adapter exported as a sequence-classification model; score shift "
                     f"{shift:.6g} is in config.lora_rlhf_score_shift")

    card = merged_card(meta, str(adapter), dtype, base_license(name, revision, online=False), head_note=head_note)
    _save(merged, folder if _has_tokenizer(folder) else Path(path), out_dir, card,
          folder / HEAD_FILE if meta.get("head") else None, revision if not _has_tokenizer(folder) else None)
    return MergeResult(out_dir, name, dtype, kind, notes)


def _merged_causal_lm(base_cfg: ModelConfig, folder: Path) -> Any:
    from peft import PeftModel

    base, _ = load_pretrained(base_cfg, QuantizationConfig(mode="none"), pad_token_id=None, for_training=False)
    peft_model = PeftModel.from_pretrained(base, str(folder))
    # safe_merge: check the merged weights for NaNs before replacing the base weights.
    return peft_model.merge_and_unload(safe_merge=True)


def _as_sequence_classifier(causal: Any, config: Any, head: ScalarHead, meta: dict[str, Any],
                            dtype: torch.dtype) -> tuple[Any, float]:
    """Move the merged backbone under a ...ForSequenceClassification with the head as its `score` layer."""
    from transformers import AutoModelForSequenceClassification

    cls_config = copy.deepcopy(config)
    cls_config.num_labels = 1
    cls_config.pad_token_id = causal.config.pad_token_id if causal.config.pad_token_id is not None else 0
    shift = float(head.linear.bias.item()) - float(meta.get("reward_offset") or 0.0)
    cls_config.lora_rlhf_score_shift = shift
    cls_config.lora_rlhf_role = meta.get("role")
    try:
        model = AutoModelForSequenceClassification.from_config(cls_config, dtype=dtype)
    except ValueError as e:
        raise ModelError(f"'{config.model_type}' models have no sequence-classification class in transformers, "
                         f"so this {meta.get('role')} adapter cannot be exported merged ({e})",
                         fix="share the adapter itself (`lora-rlhf push`) instead") from e
    prefix = causal.base_model_prefix
    getattr(model, prefix).load_state_dict(getattr(causal, prefix).state_dict())
    with torch.no_grad():
        model.score.weight.copy_(head.linear.weight.to(dtype).reshape_as(model.score.weight))
    return model, shift


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _save(model: Any, tokenizer_src: Path | str, out_dir: Path, card: str, head_file: Path | None,
          revision: str | None) -> None:
    """Write into a temporary sibling and rename: an interrupted merge never leaves a half-written model."""
    from transformers import AutoTokenizer

    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(tokenizer_src), revision=revision).save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        if head_file is not None:
            shutil.copyfile(head_file, tmp / HEAD_FILE)
