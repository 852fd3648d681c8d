"""Model cards (README.md with YAML front matter) for adapters pushed to the Hub and for merged models.

A card is built only from files the stages wrote (docs/FORMATS.md): `lora_rlhf.json` for the base, its
fingerprint and the training quantization; `recipe.yaml` for the resolved recipe; `metrics.json` for the final
metrics; an evaluation report (`OUT/eval/report.md`) when one exists. Nothing here touches the network: the
base's license is looked up by the caller (lora_rlhf.hub.client) and passed in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_rlhf import __version__

# Embedded bases -> (Hub id of the original model, its license), so cards link the real model.
KNOWN_BASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
UNKNOWN_LICENSE = "other"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CardInputs:
    """Everything a card says, gathered from one adapter folder (see `gather`)."""

    meta: dict[str, Any]
    recipe_yaml: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    eval_report: str | None = None


def sidecar(folder: Path, name: str) -> Path | None:
    """A stage file (recipe.yaml, metrics.json) in the adapter folder, or in its parent for PPO's
    `OUT/ppo/{policy,value}` layout where the run writes them once for both adapters."""
    for candidate in (folder / name, folder.parent / name):
        if candidate.is_file():
            return candidate
    return None


def eval_report_for(folder: Path) -> Path | None:
    """`OUT/eval/report.md` of the run an adapter folder belongs to (OUT/sft, OUT/dpo or OUT/ppo/policy)."""
    for run in (folder.parent, folder.parent.parent):
        candidate = run / "eval" / "report.md"
        if candidate.is_file():
            return candidate
    return None


def gather(folder: Path, meta: dict[str, Any]) -> CardInputs:
    recipe = sidecar(folder, "recipe.yaml")
    metrics = sidecar(folder, "metrics.json")
    report = eval_report_for(folder) if meta.get("role") == "policy" else None
    return CardInputs(
        meta=meta,
        recipe_yaml=recipe.read_text() if recipe else None,
        metrics=_read_metrics(metrics) if metrics else {},
        eval_report=report.read_text() if report else None,
    )


def base_model_id(name_or_path: str) -> str | None:
    """The Hub id a card's `base_model:` can name: embedded -> its original; a Hub id -> itself; a local
    folder -> None (the Hub rejects paths there)."""
    if name_or_path in KNOWN_BASES:
        return KNOWN_BASES[name_or_path][0]
    if Path(name_or_path).expanduser().exists() or not _HUB_ID.match(name_or_path):
        return None
    return name_or_path


def license_from_readme(readme: Path) -> str | None:
    """`license:` from a model card's YAML front matter, or None."""
    front = read_front_matter(readme.read_text(errors="replace")) if readme.is_file() else {}
    value = front.get("license")
    return str(value) if value else None


def adapter_card(inputs: CardInputs, repo_id: str, *, subfolder: str | None = None, license: str | None = None,
                 base_model: str | None = None, others: list[tuple[str, str]] | None = None) -> str:
    """README.md for one adapter. `others`: (subfolder, role) of further adapters in the same repo."""
    meta = inputs.meta
    base = meta.get("base", {})
    role, stage = meta.get("role", "policy"), meta.get("stage", "sft")
    base_id = base_model or base_model_id(str(base.get("name_or_path", "")))
    ref = f"{repo_id}:{subfolder}" if subfolder else repo_id
    tags = ["lora-rlhf", "rlhf", "peft", "lora", stage]
    if meta.get("quantization") == "4bit":
        tags.append("qlora")
    header: dict[str, Any] = {}
    if base_id:
        header["base_model"] = base_id
    header["library_name"] = "peft"
    header["license"] = license or UNKNOWN_LICENSE
    header["tags"] = list(dict.fromkeys(tags))
    if role == "policy":
        header["pipeline_tag"] = "text-generation"

    what = {"policy": "a policy (causal LM) LoRA adapter",
            "reward": "a reward model: a LoRA adapter plus a scalar head (`head.safetensors`)",
            "value": "a PPO value function: a LoRA adapter plus a scalar head (`head.safetensors`)"}.get(role, role)
    how = (f"stage `{stage}`: direct preference optimisation (Rafailov et al. 2023) from ranked comparisons, "
           "against the SFT adapter as the frozen reference" if stage == "dpo"
           else f"stage `{stage}` of the InstructGPT recipe: SFT -> reward model -> PPO")
    lines = [f"# {repo_id.split('/')[-1]}" + (f" / {subfolder}" if subfolder else ""), "",
             f"This is {what}, trained with lora-rlhf ({how}).", ""]
    lines += _base_section(meta, base_id, license)
    lines += _usage_section(ref, role, base_id or str(base.get("name_or_path")), subfolder)
    if others:
        lines += ["## Other adapters in this repository", "",
                  "| subfolder | role | load with lora-rlhf |", "|---|---|---|"]
        lines += [f"| `{sub}/` | {r} | `{repo_id}:{sub}` |" for sub, r in others]
        lines.append("")
    lines += _metrics_section(inputs.metrics)
    if inputs.eval_report:
        lines += ["## Evaluation", "", _demote_headings(_drop_images(inputs.eval_report).strip()), ""]
    if inputs.recipe_yaml:
        lines += ["## Training recipe", "", "The fully resolved recipe (defaults and `--set` overrides applied):",
                  "", "```yaml", inputs.recipe_yaml.rstrip(), "```", ""]
    return _with_front_matter(header, lines)


def index_card(repo_id: str, adapters: list[tuple[str, str]], license: str | None, base_model: str | None) -> str:
    """Root README.md for a repo holding several adapters in subfolders and none at its root."""
    header: dict[str, Any] = {}
    if base_model:
        header["base_model"] = base_model
    header.update({"library_name": "peft", "license": license or UNKNOWN_LICENSE,
                   "tags": ["lora-rlhf", "rlhf", "peft", "lora"]})
    lines = [f"# {repo_id.split('/')[-1]}", "", "LoRA adapters trained with lora-rlhf, one per subfolder "
             "(each with its own README.md):", "", "| subfolder | role | load with lora-rlhf |", "|---|---|---|"]
    lines += [f"| `{sub}/` | {role} | `{repo_id}:{sub}` |" for sub, role in adapters]
    return _with_front_matter(header, lines + [""])


def merged_card(meta: dict[str, Any], adapter: str, dtype: str, license: str | None,
                base_model: str | None = None, head_note: str | None = None) -> str:
    """README.md for a merged model folder written by `lora-rlhf merge`."""
    base = meta.get("base", {})
    base_id = base_model or base_model_id(str(base.get("name_or_path", "")))
    header: dict[str, Any] = {}
    if base_id:
        header["base_model"] = base_id
    header.update({"library_name": "transformers", "license": license or UNKNOWN_LICENSE,
                   "tags": ["lora-rlhf", "rlhf", "merged", str(meta.get("stage", "sft"))]})
    lines = ["# Merged model", "",
             f"The LoRA adapter `{adapter}` merged into a {dtype} copy of its base with lora-rlhf "
             f"{__version__}: a plain transformers model folder that any engine serving Hugging Face models loads "
             "without PEFT.", ""]
    lines += _base_section(meta, base_id, license)
    if head_note:
        lines += [head_note, ""]
    return _with_front_matter(header, lines)


# ---------------------------------------------------------------------------------------------- sections
def _base_section(meta: dict[str, Any], base_id: str | None, license: str | None) -> list[str]:
    base = meta.get("base", {})
    name = base.get("name_or_path")
    rows = [("base model", f"`{name}`" + (f" (Hub: [`{base_id}`](https://huggingface.co/{base_id}))"
                                           if base_id and base_id != name else "")),
            ("base revision", f"`{base.get('revision')}`" if base.get("revision") else "default branch"),
            ("base config fingerprint", f"`{base.get('fingerprint')}`"),
            ("quantization in training", f"`{meta.get('quantization')}`"),
            ("stage / role", f"`{meta.get('stage')}` / `{meta.get('role')}`"),
            ("lora-rlhf version", f"`{meta.get('lora_rlhf_version')}`")]
    if meta.get("reward_offset"):
        rows.append(("reward offset (subtracted from the head output)", f"`{meta['reward_offset']}`"))
    lines = ["## Base model", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    lines.append("lora-rlhf refuses to load this adapter on a base whose config fingerprint differs "
                 "(the LoRA weights would not fit).")
    if not base_id:
        lines.append("The base was a local folder, so `base_model` is not set in this card's metadata: "
                     "edit it to the Hub id of that model if it has one.")
    if not license:
        lines.append("The base model's license could not be determined (`license: other`): this adapter is a "
                     "derivative of its base, so check the base's license before using or sharing it.")
    return lines + [""]


def _usage_section(ref: str, role: str, base: str, subfolder: str | None) -> list[str]:
    repo_id = ref.split(":")[0]
    sub_arg = f', subfolder="{subfolder}"' if subfolder else ""
    if role == "policy":
        cli = [f"lora-rlhf generate -a {ref} 'Write a haiku about rain.'",
               f"lora-rlhf merge {ref} merged/ --dtype bf16   # a plain transformers model"]
    elif role == "reward":
        cli = [f"# in a recipe:  ppo.reward_adapter: {ref}   (or compare.labeler: {ref})"]
    else:
        cli = [f"# a PPO value function: lora-rlhf loads it (with its head) wherever an adapter is taken: {ref}"]
    lines = ["## Usage", "", "With lora-rlhf (Hub references: `user/name`, `user/name@revision`, "
             "`user/name:subfolder`):", "", "```bash", *cli, "```", ""]
    lines += ["With PEFT directly:", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base}")',
              f'model = PeftModel.from_pretrained(base, "{repo_id}"{sub_arg})', "```", ""]
    if role != "policy":
        lines += ["The scalar head is not part of the PEFT model: `head.safetensors` holds `weight` [1, hidden] "
                  "and `bias` [1], applied to the last hidden state of the last real token; lora-rlhf loads it "
                  "with the adapter.", ""]
    return lines


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    flat = _flatten(metrics)
    if not flat:
        return []
    lines = ["## Training metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
    return lines + [""]


# ---------------------------------------------------------------------------------------------- helpers
def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _drop_images(markdown: str) -> str:
    """The report's plots are files next to it, not in the repo: their links would be broken on the Hub."""
    return re.sub(r"^!\[[^\]]*\]\([^)]*\)\s*$\n?", "", markdown, flags=re.M)


def _demote_headings(markdown: str) -> str:
    """The report's own headings go two levels down so they nest under this card's `## Evaluation`."""
    return re.sub(r"^(#{1,4}) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", markdown, flags=re.M)


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata of a card, {} when it has none."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _with_front_matter(header: dict[str, Any], lines: list[str]) -> str:
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + "\n".join(lines).rstrip() + "\n"
