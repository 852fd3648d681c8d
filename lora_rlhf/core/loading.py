"""Loading: the only place a model, a tokenizer or a model config is read from disk or the Hub.

`load_pretrained` loads any transformers auto class (the causal LM every shared base wraps; the
sequence classifier the reward stage trains) with one rule for device, compute dtype, quantization, the
pad token and error messages. `load_base_model` adds what a shared base needs on top: k-bit preparation
for training, frozen base weights, and the base's identity (`info`) that adapters are checked against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_rlhf.core import distributed
from lora_rlhf.core.adapters import base_fingerprint
from lora_rlhf.core.memory import trim_heap
from lora_rlhf.core.models import hub_load_error, resolve_model
from lora_rlhf.errors import ModelError
from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

# Pad tokens to prefer over the end-of-turn token, in order (all in the vocabulary already: no embedding resize).
_PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>")


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA GPU is visible",
                         fix="set model.device: auto (or cpu), or check the NVIDIA driver / CUDA_VISIBLE_DEVICES")
    if cfg.device == "auto":  # ACCELERATE_USE_CPU=1 (a launch on the CPU, as the tests do) means the CPU
        cuda = torch.cuda.is_available() and not distributed.cpu_requested()
        return distributed.local_device(torch.device("cuda" if cuda else "cpu"))
    return distributed.local_device(torch.device(cfg.device))


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        # On the CPU fp32 is both faster and exact; on a GPU the 16-bit type it computes natively.
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]


def native_bf16(device: torch.device) -> bool:
    """bf16 in the GPU's hardware: NVIDIA compute capability 8.0 on (A100, RTX 30xx, L4, H100), and ROCm GPUs.
    `torch.cuda.is_bf16_supported()` also says yes on a V100 or T4, which only emulate bf16 (no bf16 tensor
    cores: several times slower than their fp16); it also asks the current device, not `device`."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype our own training loop (PPO) autocasts its forwards to: the compute dtype on a GPU when it is
    16-bit; None (no autocast) otherwise.

    PEFT's k-bit preparation upcasts embeddings, norms and the LM head to fp32, and a bitsandbytes 4-bit layer then
    computes in its input's dtype and returns it: without autocast every matmul, the attention (no flash kernel)
    and the KV cache run in fp32 on the GPU. The TRL-trained stages get autocast from the Trainer (bf16 / fp16
    set by `trainer_setup.trainer_args`); PPO, our own loop, asks for the same. On the CPU the compute dtype is the
    base's own (fp32 with `auto`), and bf16 autocast there is slow on CPUs without AVX512-BF16. TF32 stays off:
    it would change every fp32 matmul of the process (eval's, the reward reload check's), and under autocast the
    large ones run in 16 bits anyway; a user who wants it sets torch.backends.cuda.matmul.allow_tf32 themselves.
    """
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return dtype
    return None


def load_tokenizer(model_cfg: ModelConfig | str):
    """The base's tokenizer (a recipe's model section, or a model name), right padding, with a pad token
    distinct from the end-of-turn token."""
    from transformers import AutoTokenizer

    if isinstance(model_cfg, str):
        model_cfg = ModelConfig(name=model_cfg)
    path = resolve_model(model_cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_cfg.revision,
                                                  trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(model_cfg, path, e, "tokenizer") from e
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # A pad equal to the end-of-turn token makes "not padding" masks hide real separators.
        for candidate in (*_PAD_CANDIDATES, tokenizer.unk_token):
            if candidate and candidate != tokenizer.eos_token and candidate in tokenizer.get_vocab():
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_config(model_cfg: ModelConfig):
    """The base's transformers config alone (no weights): enough to check that an adapter fits."""
    from transformers import AutoConfig

    path = resolve_model(model_cfg.name)
    try:
        return AutoConfig.from_pretrained(path, revision=model_cfg.revision,
                                          trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(model_cfg, path, e, "config") from e


def quantization_config(q: QuantizationConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if q.mode == "4bit":
        # FSDP / ZeRO shard flat parameters of one dtype: the packed 4-bit weights must then be stored in the
        # compute dtype rather than uint8 (PEFT's FSDP-QLoRA recipe).
        storage = dtype if distributed.sharded_engine() else torch.uint8
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                  bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=storage)
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def lora_config(settings: LoraSettings, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, bias=settings.bias, task_type=task_type)


def load_pretrained(model_cfg: ModelConfig, quant: QuantizationConfig, pad_token_id: int | None,
                    auto_class: Any = None, for_training: bool = True, **kwargs: Any) -> tuple[Any, torch.dtype]:
    """Load `auto_class` (default AutoModelForCausalLM) on the recipe's device, dtype and quantization.

    Returns (model, compute dtype). `pad_token_id` (the tokenizer's, see `load_tokenizer`) goes into the
    model's config unless None. Every weight is frozen; with `for_training` a quantized model is prepared
    for k-bit training (and gradient checkpointing is switched on when the recipe asks for it).
    """
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    device = resolve_device(model_cfg)  # under a launcher: this rank's own GPU
    dtype = compute_dtype(model_cfg, device)
    # Ranks never race on a cache folder: the embedded model converts under a lock (models.prepare_embedded), and
    # huggingface_hub locks each file it downloads, so N ranks fetch a Hub model once.
    path = resolve_model(model_cfg.name)
    # Under FSDP / ZeRO the engine places (and shards) the weights; otherwise every weight goes to this rank's device.
    sharded = distributed.sharded_engine() is not None
    try:
        model = auto_class.from_pretrained(
            path, revision=model_cfg.revision, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
            quantization_config=quantization_config(quant, dtype),
            device_map=None if sharded else {"": str(device)}, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(model_cfg, path, e, "model") from e
    disable_cpu_weight_repacking(model)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = pad_token_id
    if for_training and quant.mode != "none" and not sharded:  # it upcasts norms to fp32: FSDP needs one dtype
        from peft import prepare_model_for_kbit_training

        # Non-reentrant checkpointing: the reentrant kind breaks under DDP (parameters marked ready twice).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif for_training and model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if device.type == "cpu" and quant.mode != "none":
        release_checkpoint_file(model)
        trim_heap()  # quantizing on the CPU freed an fp32 copy of every weight: hand it back
    for p in model.parameters():
        p.requires_grad_(False)
    return model, dtype


def load_base_model(model_cfg: ModelConfig, quant: QuantizationConfig, for_training: bool = True,
                    tokenizer: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """The base causal LM for a shared base. Returns (model, tokenizer, info: the identity adapters record);
    `tokenizer`, when given, is `load_tokenizer(model_cfg)`'s result, not loaded again."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_cfg)
    model, _ = load_pretrained(model_cfg, quant, tokenizer.pad_token_id, for_training=for_training)
    info = {"name_or_path": model_cfg.name, "revision": model_cfg.revision,
            "fingerprint": base_fingerprint(model.config), "quantization": quant.mode}
    return model, tokenizer, info


def _load_error(model_cfg: ModelConfig, path: str, error: Exception, what: str) -> ModelError:
    if Path(path).exists():
        return ModelError(f"cannot load the {what} of model folder '{path}': {error}",
                          fix="check that the folder was written by save_pretrained and is complete")
    return hub_load_error(model_cfg.name, error)


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


def disable_cpu_weight_repacking(model: nn.Module) -> None:
    """Keep one numeric path for 4-bit layers on CPUs with AVX512-BF16.

    There bitsandbytes repacks a layer's weights in place the first time it runs in eval mode without grad, and
    then computes differently from the training path: PPO's rollout log-probs would not match its training
    forward (ratio != 1 before any update), saved adapters would not reproduce logits, and the "frozen" base
    weights would change bytes. Worse, the repacked kernel has no backward: after a rollout, training-mode
    forwards use it too, and gradients stop at every base linear (measured with bitsandbytes 0.50: the input
    gradient of a repacked layer is None). GPUs are unaffected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
