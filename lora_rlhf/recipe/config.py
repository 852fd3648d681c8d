"""The recipe: one YAML file with a section per concern, validated in one pass.

    output_dir / seed                   where every stage writes (`OUT/sft`, `OUT/reward`, `OUT/ppo`, ...)
    model, quantization, lora           the shared base and the adapters put on it
    data                                datasets by role: sft, reward, dpo, prompts, ptx, eval
    sft, reward, dpo                    our keys plus any trl.SFTConfig / RewardConfig / DPOConfig argument
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
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_rlhf.errors import RecipeError
from lora_rlhf.recipe.ppo import PPOSection
from lora_rlhf.recipe.schema import (
    Range,
    build,
    check_number,
    check_value,
    did_you_mean,
    ranged,
    unknown_key_problem,
)

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
    r: int = ranged(16, gt=0)
    """Adapter rank: capacity vs. size. 8-64 is typical."""
    alpha: int = ranged(32, gt=0, why="the update is scaled by alpha / r")
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = ranged(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """`all-linear` (QLoRA's choice) or a list of module names such as [q_proj, v_proj]."""
    bias: Literal["none", "all", "lora_only"] = "none"


@dataclass
class DatasetConfig:
    path: str
    """A local .jsonl/.json/.csv/.parquet file or a Hugging Face Hub dataset id."""
    split: str = "train"
    """Split to read (Hub datasets; local files have only `train`)."""
    subset: str | None = None
    """Hub dataset configuration name."""
    eval_fraction: float = ranged(0.0, ge=0, lt=1)
    """Share of rows held out for evaluation (0 = none)."""
    max_samples: int | None = ranged(None, gt=0)
    """Use at most this many rows (after shuffling with the recipe seed)."""


@dataclass
class DataConfig:
    sft: DatasetConfig | None = None
    """Demonstrations for step 1: prompt/completion, messages, or text."""
    reward: DatasetConfig | None = None
    """Comparisons for step 2: rankings (see docs/FORMATS.md) or chosen/rejected preferences."""
    reward_eval: DatasetConfig | None = None
    """Held-out comparisons (same formats) for the reward model's pairwise accuracy, instead of holding out
    data.reward.eval_fraction of data.reward's prompts."""
    dpo: DatasetConfig | None = None
    """Comparisons for `lora-rlhf dpo`, in the same formats (default: data.reward, the same comparisons)."""
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
    long_rows: Literal["truncate", "drop"] = "truncate"
    """Rows longer than max_length tokens. `truncate` (TRL's way, so the default: no demonstration is lost): the
    end of the answer is cut, so the model does not learn where such an answer stops; a row whose prompt alone
    fills max_length has nothing left to learn and is dropped. `drop`: only whole rows are trained. Either way
    the counts are logged and in metrics.json."""


@dataclass
class RewardSection:
    """Step 2. Besides these keys, any `trl.RewardConfig` argument may be given and is passed through."""

    group_by_prompt: bool = True
    """Keep all K(K-1)/2 pairs of one prompt in the same batch (the paper's fix for RM overfitting)."""
    init_adapter: str | None = None
    """Start the reward LoRA from this adapter (default: the SFT stage's output when it exists)."""
    normalize: bool = True
    """Set an offset so that the SFT demonstrations score 0 on average (the paper's bias)."""
    head_init: Literal["zeros", "normal"] = "normal"
    """A new scalar head's weights: `normal` (transformers' init, std = the model's initializer_range) or `zeros`
    (every score starts at 0, so the first steps fit the head to the frozen features before the LoRA moves: the
    LoRA's first gradients then point somewhere useful instead of along a random head)."""
    head_learning_rate: float | None = ranged(None, gt=0)
    """Learning rate of the scalar head (null: the LoRA weights' learning_rate). The head starts from random
    numbers while the LoRA starts from the SFT adapter: on few comparisons it wants a higher rate."""


PairRule = Literal["all", "best_vs_rest"]


@dataclass
class DPOSection:
    """Direct preference optimisation from the comparisons. Besides these keys, any `trl.DPOConfig` argument
    (beta, loss_type, learning_rate, precompute_ref_log_probs, max_length, ...) may be given and is passed through."""

    sft_adapter: str | None = None
    """The adapter the policy starts from and the frozen reference is (default: the SFT stage's output when it
    exists, else a fresh adapter against the bare base)."""
    pairs: PairRule = "all"
    """From K-wise rankings: `all` K(K-1)/2 pairs of a prompt (the reward model's rule), or `best_vs_rest`: each
    best-ranked response against every other (K-1 pairs, fewer steps, less signal)."""


@dataclass
class CompareSection:
    """Sampling K responses per prompt and ranking them."""

    k: int = ranged(4, ge=2, why="a ranking compares responses")
    """Responses per prompt (the paper: 4..9)."""
    labeler: str | None = None
    """`module:function` (prompt, responses -> scores) or a reward adapter folder / Hub id."""
    adapter: str | None = None
    """Adapter that samples (default: the SFT stage's output when it exists, else the bare base)."""
    max_new_tokens: int = ranged(128, gt=0)
    temperature: float = ranged(1.0, gt=0, why="compare samples k different responses")
    top_p: float = ranged(1.0, ge=0, le=1)
    batch_size: int = ranged(8, gt=0)
    """Prompts per generation batch (each gives k responses): memory vs. speed."""


@dataclass
class EvalSection:
    """Held-out evaluation of policies."""

    max_new_tokens: int = ranged(128, gt=0)
    num_samples: int = ranged(5, ge=0)
    """Example prompt / response pairs shown in the report."""
    labeler: str | None = None
    """`module:function` judging task success (default: the reward model only)."""
    temperature: float = ranged(0.7, ge=0)
    """Sampling temperature of the evaluated responses (KL is measured on the same tempered distribution);
    0 decodes greedily, for a deterministic table (KL then at temperature 1)."""
    top_p: float = ranged(1.0, ge=0, le=1)
    batch_size: int = ranged(8, gt=0)
    """Prompts per generation / scoring batch: memory vs. speed."""
    general_text: str | None = None
    """A .jsonl file with a `text` column held out from training: perplexity on it measures the alignment tax."""
    general_max_texts: int = ranged(64, gt=0)
    """Use at most this many rows of general_text (each cut to general_max_tokens)."""
    general_max_tokens: int = ranged(256, gt=0)
    """Tokens of each general text that are scored (longer texts are cut): the perplexity's cost and memory."""


@dataclass
class DistributedConfig:
    """Several processes (torchrun / accelerate launch); ignored in one process."""

    timeout_minutes: float = ranged(30.0, gt=0)
    """How long a rank waits for the others at a collective before it stops and names the ranks that never came.
    Long enough for the longest time rank 0 works alone (the reward stage reloads and checks the reward model and
    scores the demonstrations: minutes at 8B); lower it to notice a hung rank sooner. The process group (NCCL, gloo)
    gets the same timeout: NCCL's own default of 10 minutes would kill that reward check on a large model."""


# lora-rlhf's values of TRL trainer arguments (SFTConfig / RewardConfig / DPOConfig), by section, where TRL's own do
# not suit a LoRA run on one GPU, plus the TRL values the planner reads. Loading lays the recipe's section over them
# (`recipe_from_dict`), so `recipe.trainer_args[section]` holds every value a stage passes, the planner reads the same
# object and recipe.yaml shows them all. What follows from other settings, the data or the machine is derived when a
# stage runs and never stored here (stages/trainer_setup.trainer_args): bf16/fp16 from the compute dtype on the
# device, gradient checkpointing from model.gradient_checkpointing (`Recipe.gradient_checkpointing`), and
# eval_strategy when the stage has held-out data.
_COMMON_TRAINER_DEFAULTS: dict[str, Any] = {
    "logging_steps": 5,
    "max_length": 512,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 1,  # one rolling checkpoint
    "report_to": "none",
    # LoRA under DDP: every trainable parameter is used in each step. Looking for unused ones costs a graph walk
    # and breaks with gradient checkpointing; transformers turns the search on for any model that is not a
    # PreTrainedModel, and a PEFT model is not one.
    "ddp_find_unused_parameters": False,
    "gradient_accumulation_steps": 1,  # TRL's own
}
TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {
        **_COMMON_TRAINER_DEFAULTS,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 4,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
    },
    "reward": {
        **_COMMON_TRAINER_DEFAULTS,
        "num_train_epochs": 1,  # the paper's RM overfits after one epoch
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-4,
    },
    "dpo": {
        **_COMMON_TRAINER_DEFAULTS,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        # TRL's learning rate (1e-6) is for full fine-tuning: LoRA takes a larger one, as in SFT (5e-5 is not tuned
        # on a bench yet).
        "learning_rate": 5e-5,
        # The reference's log-probs once, before the first step, instead of a reference forward in every step:
        # measured on the CPU (tiny Llama, 4-bit, 32 pairs in batches of 4, fresh processes alternating on a shared
        # 2-core machine), one epoch took as long either way (37-44 s), two epochs 30-38 % less wall time with it
        # (21-55 s against 32-79 s): each epoch after the first skips the reference forwards. Set false to start
        # steps at once.
        "precompute_ref_log_probs": True,
        "disable_dropout": True,  # TRL's own: the planner leaves the adapters' dropout out of DPO's memory then
    },
}


StageName = Literal["data", "sft", "compare", "reward", "dpo", "ppo", "ppo-ptx", "eval"]
STAGES: tuple[str, ...] = typing.get_args(StageName)  # the pipeline's stages, in order: the one list of them


@dataclass
class PipelineSection:
    """`lora-rlhf pipeline`: which stages run, in order; complete stages are skipped."""

    stages: list[StageName] = field(
        default_factory=lambda: ["data", "sft", "compare", "reward", "ppo", "eval"])
    """`ppo` is plain PPO (ptx_coef 0) into OUT/ppo; `ppo-ptx` uses ppo.ptx_coef into OUT/ppo-ptx; `dpo` (optional)
    trains a policy by DPO from the same comparisons into OUT/dpo."""
    data_builder: str | None = None
    """`module:function(recipe, **data_builder_args)` that writes the datasets the recipe names (the demo's)."""
    data_builder_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for data_builder (sizes, samples per prompt...)."""
    reward_eval_fraction: float = ranged(0.1, ge=0, lt=1)
    """Held-out share of compare's rankings, for the reward model's pairwise accuracy."""


@dataclass
class Recipe:
    output_dir: str = "runs/default"
    """Every stage writes below this folder."""
    seed: int = ranged(42, ge=0, le=2**32 - 1)  # numpy's seeds
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTSection = field(default_factory=SFTSection)
    reward: RewardSection = field(default_factory=RewardSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    compare: CompareSection = field(default_factory=CompareSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    eval: EvalSection = field(default_factory=EvalSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    trainer_args: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(TRAINER_DEFAULTS),
                                                    metadata={"internal": True})
    """Pass-through trainer arguments by section (`sft` -> SFTConfig kwargs, `reward` -> RewardConfig, `dpo` ->
    DPOConfig), resolved: TRAINER_DEFAULTS with the recipe's own values laid over them."""

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) / stage

    def gradient_checkpointing(self, section: str | None = None) -> bool:
        """Whether a stage checkpoints activations: its section's `gradient_checkpointing` (sft, reward, dpo) when
        the recipe sets one, else model.gradient_checkpointing. Derived rather than stored in the section, so that
        `--set model.gradient_checkpointing=true` on a saved recipe still reaches every stage."""
        own = self.trainer_args.get(section or "", {}).get("gradient_checkpointing")
        return self.model.gradient_checkpointing if own is None else bool(own)


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
    if section == "dpo":
        from trl import DPOConfig

        return DPOConfig
    from trl import RewardConfig

    return RewardConfig


# TRL/transformers arguments whose range the trainers check only once training starts (or never): checked here, by
# the same `check_number` as our own fields, so a bad value fails with the recipe's other problems, before a model
# loads or an output folder is touched. Every other float argument must be finite.
_POSITIVE, _NON_NEGATIVE = Range(gt=0), Range(ge=0)
_TRAINER_RANGES: dict[str, Range] = {
    "learning_rate": _NON_NEGATIVE, "num_train_epochs": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": _NON_NEGATIVE, "warmup_ratio": _NON_NEGATIVE, "warmup_steps": _NON_NEGATIVE,
    "per_device_train_batch_size": _POSITIVE, "per_device_eval_batch_size": _POSITIVE,
    "gradient_accumulation_steps": _POSITIVE, "max_length": _POSITIVE, "logging_steps": _POSITIVE,
    "save_steps": _POSITIVE, "eval_steps": _POSITIVE, "save_total_limit": _POSITIVE,
    "beta": _POSITIVE, "precompute_ref_batch_size": _POSITIVE,
    "max_steps": Range(gt=0, also=(-1,), why="or -1: use num_train_epochs"),
}
# trl 1.16 DPOConfig.loss_type values: DPOTrainer rejects another only at the first training step, after the model
# has loaded and the output folder is made (tests/test_config.py checks this list against TRL's own).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


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
            if section == "dpo" and key == "loss_type":
                value = _check_loss_types(value, problems)
            trial: list[str] = []
            trl_part[key] = check_value(value, hints.get(key, Any), f"{section}.{key}", trial)
            if not trial:
                check_number(f"{section}.{key}", trl_part[key], _TRAINER_RANGES.get(key), trial)
            problems += trial
        else:
            listing = f"valid keys: {', '.join(sorted(our_fields))} and any {cls.__name__} argument (trl docs)"
            problems.append(unknown_key_problem(section, key, sorted(our_fields | set(trl_fields)), listing))
    return ours_part, trl_part


def _check_loss_types(value: Any, problems: list[str]) -> Any:
    """dpo.loss_type: one name (as TRL's DPOConfig accepts it) or a list of names, each one TRL knows."""
    names = [value] if isinstance(value, str) else value
    if isinstance(names, list):
        for name in names:
            if isinstance(name, str) and name not in DPO_LOSS_TYPES:
                problems.append(f"'dpo.loss_type' has unknown loss '{name}'{did_you_mean(name, list(DPO_LOSS_TYPES))}; "
                                f"valid: {', '.join(DPO_LOSS_TYPES)}")
    return names


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
    trainer_args = copy.deepcopy(TRAINER_DEFAULTS)  # resolved: the recipe's values over our defaults
    body = dict(raw)
    for section, ours in (("sft", SFTSection), ("reward", RewardSection), ("dpo", DPOSection)):
        value = body.get(section)
        if isinstance(value, dict):
            body[section], given = _split_trainer_args(section, ours, value, problems)
            trainer_args[section].update(given)
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
    problem = output_dir_problem(recipe.output_dir)
    if problem:
        raise RecipeError([problem], str(path))
    return _resolve_relative_paths(recipe, path.parent)


def output_dir_problem(output_dir: str | Path) -> str | None:
    """Why `output_dir` cannot be the run folder (it, or a folder above it, is a file), else None. Every stage
    would fail on its first mkdir with a traceback; a folder that does not exist yet is created then."""
    path = Path(output_dir).expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if folder.is_dir():
                return None
            where = "is a file" if folder == path else f"lies under '{folder}', which is a file"
            return (f"output_dir '{output_dir}' {where}, not a folder (fix: set output_dir to a folder; it is "
                    "created when missing)")
    return None


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
    """The fully resolved recipe (every default filled in), in the same shape a user writes (trainer args back in
    their sections)."""
    out = dataclasses.asdict(recipe)
    extra = out.pop("trainer_args")
    for section, args in extra.items():
        out[section].update(args)
    return out


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
