"""The recipe: one YAML file with a section per concern, validated in one pass.

    output_dir / seed                   where every stage writes (`OUT/sft`, `OUT/reward`, `OUT/ppo`, ...)
    model, quantization, lora           the shared base and the adapters put on it
    data                                datasets by role: sft, reward, prompts, ptx, eval
    sft, reward                         our keys plus any trl.SFTConfig / trl.RewardConfig argument
    compare, ppo, eval                  our own sections
    distributed                         how ranks wait for each other under torchrun / accelerate launch

Unknown keys are rejected with the valid names and a "did you mean"; every problem is reported at once;
`--set section.key=value` overrides are applied to the parsed YAML before validation, so they are checked the
same way.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_rlhf.errors import RecipeError
from lora_rlhf.recipe.ppo import PPOSection
from lora_rlhf.recipe.schema import build, check_value, unknown_key_problem

EMBEDDED_MODEL = "smollm2-135m-instruct"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `2e-4` as a float (YAML 1.1 wants `2.0e-4`; every user writes `2e-4`) and refuses a
    key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (line {key_node.start_mark.line + 1}; first on line "
                    f"{seen[key]}): keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class ModelConfig:
    name: str = EMBEDDED_MODEL
    """The base: `smollm2-135m-instruct` (embedded, offline), a Hugging Face Hub id, or a local folder."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `name`."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype. `auto`: fp32 on the CPU; on a GPU bf16 where it computes bf16 natively (Ampere on), else fp16
    (V100, T4: PPO then scales its loss, as the Trainer does for sft and reward)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA if present, else CPU."""
    gradient_checkpointing: bool = False
    """Trade ~30 % more compute for much less activation memory; turn on for 7B models."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a Hub model. Only for models you trust."""


@dataclass
class QuantizationConfig:
    mode: Literal["4bit", "8bit", "none"] = "4bit"
    """`4bit`: QLoRA (NF4), ~4x smaller base. `8bit`: LLM.int8. `none`: base in the compute dtype."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type. NF4 is the QLoRA paper's choice for normally distributed weights."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit/parameter)."""


@dataclass
class LoraSettings:
    r: int = 16
    """Adapter rank: capacity vs. size. 8-64 is typical."""
    alpha: int = 32
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """`all-linear` (QLoRA's choice) or a list of module names such as [q_proj, v_proj]."""
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.r, int) and self.r <= 0:
            problems.append(f"r must be positive, got {self.r}")
        if isinstance(self.alpha, (int, float)) and not self.alpha > 0:
            problems.append(f"alpha must be positive (the update is scaled by alpha / r), got {self.alpha}")
        if isinstance(self.dropout, (int, float)) and not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class DatasetConfig:
    path: str
    """A local .jsonl/.json/.csv/.parquet file or a Hugging Face Hub dataset id."""
    split: str = "train"
    """Split to read (Hub datasets; local files have only `train`)."""
    subset: str | None = None
    """Hub dataset configuration name."""
    eval_fraction: float = 0.0
    """Share of rows held out for evaluation (0 = none)."""
    max_samples: int | None = None
    """Use at most this many rows (after shuffling with the recipe seed)."""

    def __post_init__(self) -> None:
        if isinstance(self.eval_fraction, (int, float)) and not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class DataConfig:
    sft: DatasetConfig | None = None
    """Demonstrations for step 1: prompt/completion, messages, or text."""
    reward: DatasetConfig | None = None
    """Comparisons for step 2: rankings (see docs/FORMATS.md) or chosen/rejected preferences."""
    prompts: DatasetConfig | None = None
    """Prompts for `compare` and PPO rollouts: a `prompt` column (string or messages)."""
    ptx: DatasetConfig | None = None
    """Pretraining-style text for PPO-ptx's language-modelling loss."""
    eval: DatasetConfig | None = None
    """Held-out prompts for `eval`."""


@dataclass
class SFTSection:
    """Step 1. Besides these keys, any `trl.SFTConfig` argument (learning_rate, num_train_epochs,
    per_device_train_batch_size, max_length, ...) may be given here and is passed through."""

    init_adapter: str | None = None
    """Continue training an existing adapter (folder or Hub id) instead of a fresh one."""


@dataclass
class RewardSection:
    """Step 2. Besides these keys, any `trl.RewardConfig` argument may be given and is passed through."""

    group_by_prompt: bool = True
    """Keep all K(K-1)/2 pairs of one prompt in the same batch (the paper's fix for RM overfitting)."""
    init_adapter: str | None = None
    """Start the reward LoRA from this adapter (default: the SFT stage's output when it exists)."""
    normalize: bool = True
    """Set an offset so that the SFT demonstrations score 0 on average (the paper's bias)."""


@dataclass
class CompareSection:
    """Sampling K responses per prompt and ranking them."""

    k: int = 4
    """Responses per prompt (the paper: 4..9)."""
    labeler: str | None = None
    """`module:function` (prompt, responses -> scores) or a reward adapter folder / Hub id."""
    adapter: str | None = None
    """Adapter that samples (default: the SFT stage's output when it exists, else the bare base)."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.k, int) and self.k < 2:
            raise ValueError(f"k must be at least 2 (a ranking compares responses), got {self.k}")


@dataclass
class EvalSection:
    """Held-out evaluation of policies."""

    max_new_tokens: int = 128
    num_samples: int = 5
    """Example prompt / response pairs shown in the report."""
    labeler: str | None = None
    """`module:function` judging task success (default: the reward model only)."""
    temperature: float = 0.7
    """Sampling temperature of the evaluated responses (KL is measured on the same tempered distribution);
    0 decodes greedily, for a deterministic table (KL then at temperature 1)."""
    top_p: float = 1.0
    batch_size: int = 8
    """Prompts per generation / scoring batch: memory vs. speed."""
    general_text: str | None = None
    """A .jsonl file with a `text` column held out from training: perplexity on it measures the alignment tax."""
    general_max_texts: int = 64
    """Use at most this many rows of general_text (each cut to 256 tokens)."""


@dataclass
class DistributedConfig:
    """Several processes (torchrun / accelerate launch); ignored in one process."""

    timeout_minutes: float = 30.0
    """How long a rank waits for the others at a collective before it stops and names the ranks that never came.
    Long enough for the longest time rank 0 works alone (the reward stage reloads and checks the reward model and
    scores the demonstrations: minutes at 8B); lower it to notice a hung rank sooner. The process group (NCCL, gloo)
    gets the same timeout: NCCL's own default of 10 minutes would kill that reward check on a large model."""

    def __post_init__(self) -> None:
        if isinstance(self.timeout_minutes, (int, float)) and not (math.isfinite(self.timeout_minutes)
                                                                   and self.timeout_minutes > 0):
            raise ValueError(f"timeout_minutes must be a positive number, got {self.timeout_minutes}")


StageName = Literal["data", "sft", "compare", "reward", "ppo", "ppo-ptx", "eval"]
STAGES: tuple[str, ...] = typing.get_args(StageName)  # the pipeline's stages, in order: the one list of them


@dataclass
class PipelineSection:
    """`lora-rlhf pipeline`: which stages run, in order; complete stages are skipped."""

    stages: list[StageName] = field(
        default_factory=lambda: ["data", "sft", "compare", "reward", "ppo", "eval"])
    """`ppo` is plain PPO (ptx_coef 0) into OUT/ppo; `ppo-ptx` uses ppo.ptx_coef into OUT/ppo-ptx."""
    data_builder: str | None = None
    """`module:function(recipe, **data_builder_args)` that writes the datasets the recipe names (the demo's)."""
    data_builder_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for data_builder (sizes, samples per prompt...)."""
    reward_eval_fraction: float = 0.1
    """Held-out share of compare's rankings, for the reward model's pairwise accuracy."""


@dataclass
class Recipe:
    output_dir: str = "runs/default"
    """Every stage writes below this folder."""
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTSection = field(default_factory=SFTSection)
    reward: RewardSection = field(default_factory=RewardSection)
    compare: CompareSection = field(default_factory=CompareSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    eval: EvalSection = field(default_factory=EvalSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    trainer_args: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"internal": True})
    """Pass-through trainer arguments by section (`sft` -> SFTConfig kwargs, `reward` -> RewardConfig)."""

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) / stage


# Sections whose unknown keys are passed to a TRL config class instead of being rejected.
# Keys we set ourselves are not accepted from the recipe.
_RESERVED_TRAINER_KEYS = {"output_dir", "seed", "logging_dir", "hub_token", "push_to_hub"}
# Trainer arguments a recipe sets elsewhere, once for every stage: the process group outlives a stage.
_MOVED_TRAINER_KEYS = {"ddp_timeout": "distributed.timeout_minutes"}


@functools.cache
def _trainer_args_class(section: str) -> type:
    if section == "sft":
        from trl import SFTConfig

        return SFTConfig
    from trl import RewardConfig

    return RewardConfig


# TRL/transformers arguments whose range the trainers check only once training starts (or never): checked here, so
# a bad value fails with the recipe's other problems, before a model loads or an output folder is touched.
_TRAINER_RANGES: dict[str, tuple[float, str]] = {  # name -> (bound, "gt" | "ge")
    "learning_rate": (0, "ge"), "num_train_epochs": (0, "ge"), "weight_decay": (0, "ge"),
    "max_grad_norm": (0, "ge"), "warmup_ratio": (0, "ge"), "warmup_steps": (0, "ge"),
    "per_device_train_batch_size": (0, "gt"), "per_device_eval_batch_size": (0, "gt"),
    "gradient_accumulation_steps": (0, "gt"), "max_length": (0, "gt"), "logging_steps": (0, "gt"),
    "save_steps": (0, "gt"), "eval_steps": (0, "gt"), "save_total_limit": (0, "gt"),
}


def _check_trainer_range(section: str, key: str, value: Any, problems: list[str]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{section}.{key} must be a finite number, got {value}")
    elif key == "max_steps" and (value == 0 or value < -1):
        problems.append(f"{section}.{key} must be positive (or -1: use num_train_epochs), got {value}")
    elif key in _TRAINER_RANGES:
        bound, kind = _TRAINER_RANGES[key]
        if (kind == "gt" and not value > bound) or (kind == "ge" and not value >= bound):
            problems.append(f"{section}.{key} must be {'>' if kind == 'gt' else '>='} {bound}, got {value}")


def _split_trainer_args(section: str, ours: type, data: dict[str, Any], problems: list[str]) -> tuple[dict, dict]:
    """Split a section into our keys and TRL pass-through keys; check both."""
    cls = _trainer_args_class(section)
    trl_fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in _RESERVED_TRAINER_KEYS}
    our_fields = {f.name for f in dataclasses.fields(ours)}
    ours_part, trl_part = {}, {}
    hints = _trainer_hints(section)
    for key, value in data.items():
        if key in our_fields:
            ours_part[key] = value
        elif key in _MOVED_TRAINER_KEYS:
            problems.append(f"{section}.{key}: set {_MOVED_TRAINER_KEYS[key]} instead (one timeout for every stage: "
                            "the ranks' process group is made once and outlives a stage)")
        elif key in trl_fields:
            trl_part[key] = check_value(value, hints.get(key, Any), f"{section}.{key}", problems)
            _check_trainer_range(section, key, trl_part[key], problems)
        else:
            listing = f"valid keys: {', '.join(sorted(our_fields))} and any {cls.__name__} argument (trl docs)"
            problems.append(unknown_key_problem(section, key, sorted(our_fields | set(trl_fields)), listing))
    return ours_part, trl_part


@functools.cache
def _trainer_hints(section: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(_trainer_args_class(section))
    except Exception:  # exotic annotations in TRL: skip type checks rather than fail
        return {}


def parse_overrides(overrides: list[str]) -> tuple[list[tuple[list[str], Any]], list[str]]:
    """`["ppo.kl_coef=0.1", "data.sft.path=x.jsonl"]` -> [(["ppo", "kl_coef"], 0.1), ...]; values are YAML."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set '{item}' must look like section.key=value")
            continue
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip().split("."), value))
    return parsed, problems


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    raw = copy.deepcopy(raw)
    parsed, problems = parse_overrides(overrides)
    for keys, value in parsed:
        node = raw
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                problems.append(f"--set {'.'.join(keys)}: '{k}' is not a section")
                break
            node = nxt
        else:
            node[keys[-1]] = value
    return raw, problems


def recipe_from_dict(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "recipe") -> Recipe:
    """Validate a parsed recipe. Raises RecipeError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], source)
    raw, problems = apply_overrides(raw, overrides or [])
    trainer_args: dict[str, dict[str, Any]] = {}
    body = dict(raw)
    for section, ours in (("sft", SFTSection), ("reward", RewardSection)):
        value = body.get(section)
        if isinstance(value, dict):
            body[section], trainer_args[section] = _split_trainer_args(section, ours, value, problems)
    recipe = build(Recipe, body, "", problems)
    if problems:
        raise RecipeError(problems, source)
    recipe.trainer_args = trainer_args
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file '{path}' does not exist (fix: check the path, or copy one from recipes/)"],
                          str(path))
    try:
        raw = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError([f"not valid YAML: {e}"], str(path)) from None
    except UnicodeDecodeError as e:
        raise RecipeError([f"not UTF-8 text (byte {e.start}: {e.reason}) (fix: save the recipe as UTF-8)"],
                          str(path)) from None
    recipe = recipe_from_dict(raw, overrides, source=str(path))
    return _resolve_relative_paths(recipe, path.parent)


def _resolve_relative_paths(recipe: Recipe, base: Path) -> Recipe:
    """Dataset files named relative to the recipe are found from any working directory."""
    for f in dataclasses.fields(DataConfig):
        ds: DatasetConfig | None = getattr(recipe.data, f.name)
        if ds is not None and not Path(ds.path).is_absolute() and (base / ds.path).exists():
            ds.path = str((base / ds.path).resolve())
    general = recipe.eval.general_text
    if general and not Path(general).is_absolute() and (base / general).exists():
        recipe.eval.general_text = str((base / general).resolve())
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe, in the same shape a user writes (trainer args back in their sections)."""
    out = dataclasses.asdict(recipe)
    extra = out.pop("trainer_args")
    for section, args in extra.items():
        out[section].update(args)
    return out


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
