"""A base model's shape from its `config.json` alone: no weights, no network for the shipped configs.

`ModelShape` holds the numbers memory depends on (hidden size, layers, heads, vocabulary, ...) and counts the
parameters of each kind exactly as a decoder-only transformer of the Llama family lays them out: the linear
layers bitsandbytes quantizes, and what stays in the compute dtype (embeddings, LM head, norms).

Where a shape comes from, in order: a config shipped with the package (`lora_rlhf/plan/configs/*.json`, the
models the recipes and docs name, by file name or by Hub id), a local folder's `config.json`, or the Hub
through `lora_rlhf.core.loading.load_config` (config only; it is cached after the first read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lora_rlhf.core.loading import load_config  # the one place configs are read from the Hub
from lora_rlhf.core.models import PLAIN_LM_HEAD
from lora_rlhf.errors import ModelError
from lora_rlhf.recipe.config import ModelConfig

CONFIGS = Path(__file__).parent / "configs"

# The linear layers of one decoder layer, by the module names PEFT's target_modules match.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTENTION + MLP

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only causal LM (Llama family: Llama, Mistral, Qwen2, SmolLM, ...)."""

    name: str
    hidden_size: int             # H
    intermediate_size: int       # I, the MLP's inner width
    num_layers: int              # L
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int              # V
    tie_word_embeddings: bool    # the LM head reuses the embedding matrix
    max_position_embeddings: int
    attention_bias: bool = False
    mlp_bias: bool = False
    checkpoint_bytes_per_param: int = 2  # the dtype the weights are stored in (read while loading)
    plain_lm_head: bool = True   # logits = lm_head(hidden): log-probs are taken one sequence at a time

    # ---------------------------------------------------------------- linear layers
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (in_features, out_features) of the linear layers of ONE decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        """Weights of all decoder linear layers (what 4-/8-bit quantization compresses), all layers."""
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    def linear_bias_params(self) -> int:
        """Biases of the decoder linear layers (Qwen2 has q/k/v biases); bitsandbytes keeps them unquantized."""
        shapes = self.linear_shapes()
        n = sum(shapes[m][1] for m in ("q_proj", "k_proj", "v_proj")) if self.attention_bias else 0
        n += shapes["o_proj"][1] if self.attention_bias else 0
        n += sum(shapes[m][1] for m in MLP) if self.mlp_bias else 0
        return self.num_layers * n

    # ---------------------------------------------------------------- what stays unquantized
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """0 when tied to the embeddings (one matrix serves both)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def norm_params(self) -> int:
        """Two RMSNorm weights per layer and the final norm."""
        return (2 * self.num_layers + 1) * self.hidden_size

    def total_params(self) -> int:
        return (self.linear_params() + self.linear_bias_params() + self.embedding_params() + self.lm_head_params()
                + self.norm_params())

    # ---------------------------------------------------------------- LoRA
    def lora_targets(self, target_modules: str | list[str]) -> dict[str, tuple[int, int]]:
        """The linear layers a LoRA config targets, as PEFT matches them (`all-linear`: every linear layer but
        the LM head; a list: module names matched by suffix)."""
        shapes = self.linear_shapes()
        if isinstance(target_modules, str):
            if target_modules == "all-linear":
                return shapes
            target_modules = [target_modules]
        return {name: shape for name, shape in shapes.items() if name in set(target_modules)}

    def lora_params(self, r: int, target_modules: str | list[str]) -> int:
        """Parameters of one LoRA adapter: A [r, in] + B [out, r] on every targeted layer of every block."""
        return self.num_layers * sum(r * (a + b) for a, b in self.lora_targets(target_modules).values())

    def kv_cache_bytes_per_token(self, bytes_per_value: int) -> int:
        """Keys and values of every layer for one token of one sequence."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value


def shape_from_config(config: dict[str, Any], name: str) -> ModelShape:
    """A transformers config (as a dict) -> ModelShape. Multimodal configs use their `text_config`."""
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in config]
    if missing:
        raise ModelError(f"the config of '{name}' lacks {', '.join(missing)}, so its memory cannot be planned",
                         fix="plan a decoder-only causal LM (Llama, Mistral, Qwen2, SmolLM, ...) whose config.json "
                             "has these keys")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return ModelShape(
        name=name, hidden_size=hidden,
        intermediate_size=int(config.get("intermediate_size") or 4 * hidden),
        num_layers=int(config["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings") or 0),
        attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        mlp_bias=bool(config.get("mlp_bias", False)),
        checkpoint_bytes_per_param=_DTYPE_BYTES.get(dtype.replace("torch.", ""), 2),
        plain_lm_head=config.get("model_type") in PLAIN_LM_HEAD,
    )


@cache
def shipped_configs() -> dict[str, Path]:
    """Names a shipped config answers to -> its file: the file name and the Hub id it was copied from."""
    names: dict[str, Path] = {}
    for path in sorted(CONFIGS.glob("*.json")):
        names[path.stem.lower()] = path
        hub_id = json.loads(path.read_text()).get("_name_or_path")
        if hub_id:
            names[hub_id.lower()] = path
    return names


def load_shape(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of model `name`: a shipped config, a local folder, or (config only) the Hub.

    Raises ModelError when none of these has it (an unknown id offline says so, with the fix).
    """
    shipped = shipped_configs().get(name.lower())
    if shipped is not None:
        return shape_from_config(json.loads(shipped.read_text()), name)
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return shape_from_config(json.loads((folder / "config.json").read_text()), name)
    if folder.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"'{name}' is a local path but holds no config.json, so its shape is unknown",
                         fix="point model.name at a folder written by save_pretrained, or at a Hub id")
    try:
        config = load_config(ModelConfig(name=name, revision=revision, trust_remote_code=trust_remote_code))
    except ModelError as e:
        known = ", ".join(sorted(p.stem for p in set(shipped_configs().values())))
        raise ModelError(f"cannot plan '{name}': its config.json is neither shipped with lora-rlhf nor in a local "
                         f"folder, and reading it from the Hub failed ({e.what})",
                         fix=f"give a local folder holding the model's config.json, run once with Hub access (the "
                             f"config is cached), or plan one of the shipped configs: {known}") from None
    return shape_from_config(config.to_dict(), name)
