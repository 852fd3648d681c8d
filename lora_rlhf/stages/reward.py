"""Step 2: the reward model as a LoRA adapter + scalar head on the shared base, trained with trl.RewardTrainer.

The paper: labelers rank K responses per prompt; each of the K(K-1)/2 pairs is a comparison; the RM is the SFT
model with its LM head replaced by a scalar head, trained with -log sigma(r(x, y_w) - r(x, y_l)); all pairs of
one prompt go into one batch (else the RM overfits); afterwards a bias makes the demonstrations score 0.

Here: the base is loaded as AutoModelForSequenceClassification(num_labels=1), quantized as the recipe says; the
reward LoRA starts from the SFT adapter (OUT/sft, or reward.init_adapter) and the `score` head is trained too.
Differences from plain TRL: comparisons are tokenized by lora_rlhf.core.text.encode (the same text PPO's scoring
sees), batches keep whole prompts together (`reward.group_by_prompt`), and the output is an adapter for the
CAUSAL-LM shared base: LoRA in PEFT format without the `score` module, the head as head.safetensors.

setup (validate data, tokenizer, init adapter -> model) -> train -> save -> reload the saved adapter on the
causal base and check it reproduces the trained scores -> held-out pairwise accuracy -> offset -> metadata last.
"""

from __future__ import annotations

import gc
import json
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler

from lora_rlhf.core import distributed
from lora_rlhf.core.adapters import (
    base_fingerprint,
    check_adapter_base,
    is_finished,
    recipe_adapter,
    write_adapter_meta,
)
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.data import load_sft_data
from lora_rlhf.core.heads import HEAD_FILE, ScalarHead
from lora_rlhf.core.io import write_jsonl_atomic
from lora_rlhf.core.loading import load_config, load_pretrained, load_tokenizer, lora_config
from lora_rlhf.core.logs import LogCallback, write_metrics
from lora_rlhf.core.scoring import score_texts
from lora_rlhf.core.stats import bootstrap_interval
from lora_rlhf.core.text import batches, encode
from lora_rlhf.errors import DataError, ModelError
from lora_rlhf.hub.client import local_adapter
from lora_rlhf.recipe.config import DatasetConfig, Recipe, save_recipe
from lora_rlhf.stages.memory import check_memory
from lora_rlhf.stages.rankings import Comparison, load_comparisons
from lora_rlhf.stages.stage import StageResult
from lora_rlhf.stages.trainer_setup import (
    ADAPTER,
    RecipeStepsOnResume,
    last_checkpoint,
    loss_summary,
    run_trainer,
    stage_outputs,
    trainer_args,
)

NORMALIZE_MAX_DEMOS = 1000  # demonstrations scored for the offset (a seeded sample beyond that)
CHECK_ROWS = 8  # texts scored by both the trained model and the reloaded adapter
EVAL_PAIRS = "eval_pairs.jsonl"  # every held-out comparison with both scores


# ---------------------------------------------------------------------------------------------------- data
def load_reward_data(cfg: DatasetConfig | None, seed: int = 0, eval_cfg: DatasetConfig | None = None
                     ) -> tuple[list[Comparison], list[Comparison] | None]:
    """data.reward (+ data.reward_eval) -> (train, held-out or None) comparisons: every pair of a ranking (the
    paper's rule). Held out is data.reward_eval when given, else data.reward.eval_fraction of data.reward's prompt
    lines (`rankings.load_comparisons`: never single pairs, so no prompt has pairs on both sides)."""
    if cfg is None:
        raise DataError("the recipe has no data.reward section, so the reward model has no comparisons",
                        fix="add `data: {reward: {path: rankings.jsonl}}` (rankings or chosen/rejected preferences)")
    if eval_cfg is not None and cfg.eval_fraction > 0:
        raise DataError("the recipe holds out reward data twice: data.reward.eval_fraction and data.reward_eval",
                        fix="keep one: data.reward.eval_fraction: 0, or drop data.reward_eval")
    train, held_out = load_comparisons(cfg, seed, "all")
    if eval_cfg is not None:
        held_out, _ = load_comparisons(eval_cfg, seed, "all", what="held-out reward dataset", key="data.reward_eval")
    return train, held_out


def tokenize_comparisons(comparisons: Sequence[Comparison], tokenizer: Any, max_length: int | None):
    """-> (datasets.Dataset with chosen_ids, rejected_ids, group; number of pairs dropped as too long)."""
    import datasets

    cache: dict[tuple[str, str], list[int]] = {}

    def ids(prompt: Any, response: str) -> list[int]:
        key = (json.dumps(prompt), response)
        if key not in cache:
            cache[key] = encode(tokenizer, prompt, response)
        return cache[key]

    rows = {"chosen_ids": [], "rejected_ids": [], "group": []}
    dropped = 0
    for c in comparisons:
        chosen, rejected = ids(c.prompt, c.chosen), ids(c.prompt, c.rejected)
        if max_length is not None and max(len(chosen), len(rejected)) > max_length:
            dropped += 1
            continue
        rows["chosen_ids"].append(chosen)
        rows["rejected_ids"].append(rejected)
        rows["group"].append(c.group)
    return datasets.Dataset.from_dict(rows), dropped


def demonstrations(cfg: DatasetConfig | None, seed: int) -> tuple[list[Any], list[str]] | None:
    """SFT demonstrations as (prompts, responses) for the offset; None when there are none usable."""
    if cfg is None:
        return None
    train, held = load_sft_data(cfg, seed)
    rows = train.to_list() + (held.to_list() if held is not None else [])
    prompts, responses = [], []
    for row in rows:
        if "completion" in row:
            completion = row["completion"]
            if isinstance(completion, list):
                completion = next((m["content"] for m in reversed(completion) if m["role"] == "assistant"), None)
            if completion is not None:
                prompts.append(row["prompt"])
                responses.append(completion)
        elif "messages" in row:
            messages = row["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is not None and last > 0:
                prompts.append(messages[:last])
                responses.append(messages[last]["content"])
    if not prompts:  # plain `text` demonstrations: no prompt/response split to score
        return None
    if len(prompts) > NORMALIZE_MAX_DEMOS:
        keep = sorted(random.Random(seed).sample(range(len(prompts)), NORMALIZE_MAX_DEMOS))
        prompts, responses = [prompts[i] for i in keep], [responses[i] for i in keep]
    return prompts, responses


# ---------------------------------------------------------------------------------------------------- batching
class PromptGroupBatchSampler(Sampler[list[int]]):
    """Batches of whole prompts: every pair of one prompt lands in the same batch (the paper's fix).

    `batch_size` counts pairs. The number of batches is fixed, ceil(pairs / batch_size) capped at the number
    of prompts, so the Trainer's step count holds every epoch; each epoch the prompts are shuffled and each
    goes to the least-filled batch, so batches hold about `batch_size` pairs (a prompt with more pairs than
    that fills a batch of its own). Deterministic per (seed, epoch), so --resume skips the right batches.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True):
        members: dict[int, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        self.members = list(members.values())
        self.num_batches = min(len(self.members), -(-len(groups) // max(1, batch_size)))
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.members)))
        if self.shuffle:
            rng.shuffle(order)
        batches_: list[list[int]] = [[] for _ in range(self.num_batches)]
        for g in order:
            # Least-filled batch first; ties go to the lowest index so the first prompts fill empty batches.
            target = min(range(self.num_batches), key=lambda b: len(batches_[b]))
            batches_[target].extend(self.members[g])
        if self.shuffle:
            rng.shuffle(batches_)
        yield from batches_


def _grouped_trainer_class():
    from trl import RewardTrainer

    class GroupedRewardTrainer(RewardTrainer):
        """RewardTrainer whose training batches keep all pairs of a prompt together (`group` column)."""

        def __init__(self, *args: Any, group_by_prompt: bool = True, head_learning_rate: float | None = None,
                     **kwargs: Any):
            self.group_by_prompt, self.head_learning_rate = group_by_prompt, head_learning_rate
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            # The Trainer's optimizer, with the scalar head moved into a group of its own at head_learning_rate
            # (the scheduler then scales each group from its own rate).
            optimizer = super().create_optimizer(model)
            if self.head_learning_rate is None or getattr(self, "_head_group_made", False):
                return optimizer
            head = {id(p) for p in _score_layer(self.model).parameters()}
            moved = [p for group in optimizer.param_groups for p in group["params"] if id(p) in head]
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in head]
            optimizer.add_param_group({"params": moved, "lr": self.head_learning_rate, "weight_decay": 0.0})
            self._head_group_made = True
            return optimizer

        def get_train_dataloader(self) -> DataLoader:
            dataset = self.train_dataset
            if not self.group_by_prompt or "group" not in dataset.column_names:
                return super().get_train_dataloader()
            sampler = PromptGroupBatchSampler(dataset["group"], self._train_batch_size, seed=self.args.seed)
            dataset = self._remove_unused_columns(dataset, description="training")
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            # TRL's loss, with each distinct sequence of the batch scored once (see `OncePerSequence`). Its reward
            # statistics all_gather the batch's scores, but whole-prompt batches hold different numbers of pairs
            # on different ranks: gathered row-wise instead (distributed.gather_rows), or gloo aborts.
            self.accelerator.gather = distributed.gather_rows
            try:
                return super().compute_loss(OncePerSequence(model), inputs, return_outputs, num_items_in_batch)
            finally:
                del self.accelerator.gather  # the class's own method again

    return GroupedRewardTrainer


class OncePerSequence:
    """Calls a sequence classifier once per DISTINCT row of `input_ids` and gives every row its score.

    With K responses per prompt and all K(K-1)/2 pairs of a prompt in one batch, TRL's reward batch holds each
    response K-1 times (chosen in some pairs, rejected in others): 12 rows for 4 responses at K=4. The paper's
    remedy is one forward pass per completion. Scoring the 4 distinct rows and indexing the results gives the
    same scores, the same loss and, since indexing sums the gradient of repeated rows, the same gradients, from
    a third of the rows (the demo's reward training: 344 -> 139 s). Rows are compared with their attention mask
    (TRL pads chosen and rejected alike).
    """

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        keys = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
        distinct, inverse = torch.unique(keys, dim=0, return_inverse=True)
        if len(distinct) == len(keys):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        width = input_ids.shape[1]
        outputs = self.model(input_ids=distinct[:, :width], attention_mask=distinct[:, width:].to(attention_mask.dtype),
                             **kwargs)
        outputs.logits = outputs.logits[inverse]
        return outputs


# ---------------------------------------------------------------------------------------------------- model
def load_seqcls_model(recipe: Recipe, tokenizer: Any, init_adapter: Path | None):
    """The base as a 1-label sequence classifier (quantized per recipe) wrapped with the reward LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    with suppress_seqcls_warning():  # the new `score` and the unused lm_head are expected
        model, dtype = load_pretrained(recipe.model, recipe.quantization, tokenizer.pad_token_id,
                                       AutoModelForSequenceClassification, num_labels=1)
    # The init adapter's own LoRA shape (rank, targets) wins over the recipe's: its weights must fit.
    cfg = LoraConfig.from_pretrained(str(init_adapter)) if init_adapter is not None else lora_config(recipe.lora)
    cfg.task_type, cfg.modules_to_save, cfg.inference_mode = "SEQ_CLS", ["score"], False
    model = get_peft_model(model, cfg, adapter_name=ADAPTER)
    continues_reward = init_adapter is not None and (init_adapter / HEAD_FILE).is_file()
    if recipe.reward.head_init == "zeros" and not continues_reward:
        with torch.no_grad():
            _score_layer(model).weight.zero_()
    if init_adapter is not None:
        _load_init_weights(model, init_adapter)
    return model, dtype


def _load_init_weights(model: Any, folder: Path) -> None:
    """Copy a saved causal-LM adapter's LoRA weights (and head, when it is a reward adapter) into `model`."""
    from peft import set_peft_model_state_dict

    weights = load_file(str(folder / "adapter_model.safetensors"))
    score = _score_layer(model).weight
    # PEFT expects the `score` copy in the state dict: the saved head when continuing a reward adapter, else the
    # freshly initialised one (an SFT adapter has no head).
    head = load_file(str(folder / HEAD_FILE))["weight"] if (folder / HEAD_FILE).is_file() else score.detach()
    weights["base_model.model.score.weight"] = head.reshape(score.shape).to(score.dtype).clone()
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ModelError(f"adapter '{folder}' does not fit this base's LoRA layout "
                         f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})",
                         fix="set reward.init_adapter to an adapter trained on this base, or to null")


def _score_layer(model: Any) -> torch.nn.Linear:
    """The trained copy of `score` inside PEFT's ModulesToSaveWrapper."""
    score = model.get_base_model().score
    return score.modules_to_save[ADAPTER] if hasattr(score, "modules_to_save") else score


def fix_dtypes(model: Any) -> None:
    """Undo RewardTrainer's bf16 cast of trainable weights on a quantized base (DESIGN gotcha: fp32 hidden states
    then meet a bf16 `score` and the forward fails). LoRA weights go back to fp32, PEFT's default and what the
    causal base loads them as; the head stays fp32 and reads hidden states cast to fp32, exactly as ScalarHead
    does on the causal base, so the saved adapter reproduces the trained scores."""
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    score = _score_layer(model)
    score.float()
    score.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))


def reward_training_args(recipe: Recipe, out: Path, eval_present: bool):
    from trl import RewardConfig

    return RewardConfig(**trainer_args(recipe, "reward", out, eval_present))


# ---------------------------------------------------------------------------------------------------- save
def save_reward_adapter(model: Any, tokenizer: Any, out: Path) -> ScalarHead:
    """PEFT adapter loadable onto the CAUSAL-LM base (no `score` module, task CAUSAL_LM) + head.safetensors."""
    model.save_pretrained(str(out), selected_adapters=[ADAPTER])
    weights_path = out / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    save_file({k: v for k, v in weights.items() if ".score." not in k and not k.startswith("score.")},
              str(weights_path), metadata={"format": "pt"})
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(task_type="CAUSAL_LM", modules_to_save=None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    head = ScalarHead.from_linear(_score_layer(model)).cpu()
    head.save(out)
    tokenizer.save_pretrained(str(out))
    return head


@torch.no_grad()
def seqcls_scores(model: Any, tokenizer: Any, prompts: Sequence[Any], responses: Sequence[str],
                  batch_size: int = 8) -> torch.Tensor:
    """Scores of the trained sequence classifier itself (the reference the saved adapter must reproduce)."""
    sequences = [encode(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    device = next(model.parameters()).device
    scores = torch.empty(len(sequences), dtype=torch.float32)
    model.eval()
    for rows, ids, mask in batches(sequences, batch_size, tokenizer.pad_token_id, device):
        scores[rows] = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().cpu()
    return scores


def pair_scores(shared: SharedBase, comparisons: Sequence[Comparison], batch_size: int = 16
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores (chosen [P], rejected [P]) of every comparison; each distinct text is scored once."""
    texts: dict[tuple[str, str], int] = {}
    prompts, responses = [], []
    for c in comparisons:
        for response in (c.chosen, c.rejected):
            key = (json.dumps(c.prompt), response)
            if key not in texts:
                texts[key] = len(prompts)
                prompts.append(c.prompt)
                responses.append(response)
    scores = score_texts(shared, prompts, responses, batch_size=batch_size, apply_offset=False).cpu()
    chosen = torch.stack([scores[texts[(json.dumps(c.prompt), c.chosen)]] for c in comparisons])
    rejected = torch.stack([scores[texts[(json.dumps(c.prompt), c.rejected)]] for c in comparisons])
    return chosen, rejected


def heldout_pairs(shared: SharedBase, held_out: Sequence[Comparison], path: Path) -> dict[str, Any]:
    """Score the held-out comparisons with the saved adapter; write every pair with its scores to `path`
    (which pairs the reward model gets wrong); return accuracy with its prompt-resampling interval, the pairwise
    loss -log sigma(r_chosen - r_rejected), and how many pairs and prompts it rests on."""
    chosen, rejected = pair_scores(shared, held_out)
    wins = (chosen > rejected).tolist()
    groups = [c.group for c in held_out]
    accuracy, low, high = accuracy_interval(wins, groups)
    write_jsonl_atomic(path, [{"line": c.group + 1, "prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected,
                               "chosen_score": float(a), "rejected_score": float(b), "correct": w}
                              for c, a, b, w in zip(held_out, chosen, rejected, wins, strict=True)])
    return {"eval_pairwise_accuracy": accuracy, "eval_pairwise_accuracy_low": low,
            "eval_pairwise_accuracy_high": high, "eval_pairs": len(held_out), "eval_prompts": len(set(groups)),
            "eval_pairwise_loss": float(torch.nn.functional.softplus(rejected - chosen).mean())}


def accuracy_interval(wins: Sequence[bool], groups: Sequence[int], n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """(accuracy, low, high): share of wins with a percentile bootstrap interval that resamples *prompts*
    (core.stats.bootstrap_interval): the pairs of one prompt share its responses, so they are not independent.
    wins, groups: [P] (groups: the prompt each pair came from).
    """
    if len(wins) != len(groups) or not wins:
        raise ValueError(f"need one group per win and at least one pair, got {len(wins)} and {len(groups)}")
    _, group_of = torch.unique(torch.tensor(groups), return_inverse=True)  # [P] -> 0..G-1
    size = int(group_of.max()) + 1
    won = torch.zeros(size, dtype=torch.float64).index_add_(0, group_of, torch.tensor(wins, dtype=torch.float64))
    low, high = bootstrap_interval(won, torch.bincount(group_of, minlength=size), n_boot, seed, level)  # [G], [G]
    return sum(wins) / len(wins), low, high


# ---------------------------------------------------------------------------------------------------- run
def init_adapter_for(recipe: Recipe) -> Path | None:
    """reward.init_adapter, else OUT/sft when finished, else None; refused when trained on another base."""
    source = recipe_adapter(recipe, "sft", recipe.reward.init_adapter)
    if source is None:
        return None
    folder = local_adapter(source)
    check_adapter_base(folder, {"name_or_path": recipe.model.name,
                                "fingerprint": base_fingerprint(load_config(recipe.model))})
    return folder


def run_reward(recipe: Recipe, resume: bool = False) -> Path:
    """Train the reward adapter described by `recipe`; return its output folder (OUT/reward)."""
    return run(recipe, resume=resume).output


def is_complete(recipe: Recipe) -> bool:
    return is_finished(recipe.stage_dir("reward"), "reward")


def run(recipe: Recipe, *, resume: bool | None = None) -> StageResult:
    """The stage (stages/stage.py): train the reward adapter described by `recipe` into OUT/reward."""
    out, resume = recipe.stage_dir("reward"), bool(resume)
    distributed.configure(recipe)
    # --- setup: everything that can fail on user input fails here, before anything is written
    train, held_out = load_reward_data(recipe.data.reward, recipe.seed, recipe.data.reward_eval)
    demos = demonstrations(recipe.data.sft, recipe.seed) if recipe.reward.normalize else None
    init_adapter = init_adapter_for(recipe)
    tokenizer = load_tokenizer(recipe.model)
    # The held-out pairs are scored once after training (accuracy, interval, loss: `heldout_pairs`); the Trainer's
    # own evaluation repeats that each epoch only when the recipe sets reward.eval_strategy.
    trainer_eval = held_out is not None and "eval_strategy" in recipe.trainer_args.get("reward", {})
    args = reward_training_args(recipe, out, trainer_eval)
    train_ds, dropped = tokenize_comparisons(train, tokenizer, args.max_length)
    eval_ds = tokenize_comparisons(held_out, tokenizer, args.max_length)[0] if trainer_eval else None
    if eval_ds is not None and len(eval_ds) == 0:
        from transformers.trainer_utils import IntervalStrategy

        # Every held-out pair is longer than max_length: no trainer eval; the pairwise accuracy below still runs.
        eval_ds, args.eval_strategy = None, IntervalStrategy.NO
    if len(train_ds) == 0:
        raise DataError(f"all {len(train)} training comparisons are longer than reward.max_length={args.max_length}",
                        fix="raise reward.max_length, or shorten the prompts/responses")
    longest = max(len(ids) for column in ("chosen_ids", "rejected_ids") for ids in train_ds[column])
    memory = check_memory(recipe, "reward", sequence_length=longest)
    torch.manual_seed(recipe.seed)  # the new LoRA and head init follow from the recipe, not from what ran before
    model, dtype = load_seqcls_model(recipe, tokenizer, init_adapter)
    checkpoint = last_checkpoint(out) if resume else None
    with stage_outputs(out, "reward", resume) as (log, main):
        if main:
            save_recipe(recipe, out / "recipe.yaml")
        checked = _train_and_check(recipe, model, dtype, tokenizer, args, (train, held_out),
                                   (train_ds, eval_ds, dropped), demos, init_adapter, out, checkpoint, log)
        if checked is None:  # not rank 0: it trained its share; rank 0 saves and checks
            return StageResult("reward", out)
        metrics, offset, head, base_info = checked
        metrics.update(memory.metrics())
        warn_if_at_chance(metrics, log)
        write_metrics(out, metrics)
        write_adapter_meta(out, "reward", "reward", base_info, head, reward_offset=offset)
        log.info("reward done: %s", {k: metrics.get(k) for k in (
            "train_loss", "eval_pairwise_accuracy", "eval_pairwise_accuracy_low", "eval_pairwise_accuracy_high",
            "reward_offset", "reload_max_abs_diff", "memory/peak_gb", "memory/predicted_gb")})
    return StageResult("reward", out, metrics)


def _train_and_check(recipe: Recipe, model: Any, dtype: torch.dtype, tokenizer: Any, args: Any,
                     comparisons: tuple[list[Comparison], list[Comparison] | None], datasets_: tuple[Any, Any, int],
                     demos: Any, init_adapter: Path | None, out: Path, checkpoint: str | None,
                     log: Any) -> tuple[dict[str, Any], float, ScalarHead, dict[str, Any]] | None:
    """Train; save the adapter for the causal base; reload it there as PPO will and check it reproduces the
    trained scores; held-out accuracy; the demonstrations' offset. -> (metrics, offset, head, base info), or
    None on a rank other than 0 once training and the trainer's evaluation (both collective) are done."""
    (train, held_out), (train_ds, eval_ds, dropped) = comparisons, datasets_
    log.info("reward: %d train / %d held-out comparisons (%d dropped as longer than %s tokens), init from %s, "
             "base %s (%s), group_by_prompt=%s, resume from %s", len(train_ds), len(held_out or []), dropped,
             args.max_length, init_adapter, recipe.model.name, recipe.quantization.mode,
             recipe.reward.group_by_prompt, checkpoint)
    callback = LogCallback(log)
    trainer = _grouped_trainer_class()(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        callbacks=[callback, RecipeStepsOnResume(log)], group_by_prompt=recipe.reward.group_by_prompt,
        head_learning_rate=recipe.reward.head_learning_rate)
    fix_dtypes(trainer.model)
    # --- train (Ctrl-C propagates: the newest checkpoint stays on disk for --resume)
    started = time.perf_counter()
    result = run_trainer(trainer, checkpoint)
    metrics: dict[str, Any] = {**result.metrics, "wall_seconds": time.perf_counter() - started,
                               "global_step": result.global_step, "resumed_from": checkpoint,
                               "train_pairs": len(train_ds), "pairs_dropped_too_long": dropped,
                               "init_adapter": str(init_adapter) if init_adapter else None,
                               "world_size": distributed.world_size()}
    metrics.update(loss_summary(callback.history))
    if eval_ds is not None:
        metrics.update(callback.final_eval(trainer))
    if not distributed.is_main():
        return None
    # --- save the adapter for the causal base; keep reference scores of the trained model
    check = (held_out or train)[:CHECK_ROWS]
    check_prompts = [c.prompt for c in check] + [c.prompt for c in check]
    check_responses = [c.chosen for c in check] + [c.rejected for c in check]
    reference = seqcls_scores(trainer.model, tokenizer, check_prompts, check_responses)
    head = save_reward_adapter(trainer.model, tokenizer, out)
    del trainer, model
    _free_memory()
    # --- reload exactly as PPO will: the causal-LM shared base + this folder as role `reward`
    shared = SharedBase.load(recipe.model, recipe.quantization, for_training=False, tokenizer=tokenizer)
    shared.load_adapter("reward", out, trainable=False)
    reloaded = score_texts(shared, check_prompts, check_responses, apply_offset=False).cpu()
    metrics["reload_max_abs_diff"] = float((reloaded - reference).abs().max())
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if metrics["reload_max_abs_diff"] > tolerance * max(1.0, float(reference.abs().max())):
        log.warning("the reloaded adapter's scores differ from the trained model's by %.4g (tolerance %.1g)",
                    metrics["reload_max_abs_diff"], tolerance)
    if held_out:
        metrics.update(heldout_pairs(shared, held_out, out / EVAL_PAIRS))
    offset = 0.0
    if demos is not None:
        raw = score_texts(shared, demos[0], demos[1], apply_offset=False)
        offset = float(raw.mean())
        metrics.update(demo_mean_raw_score=offset, demo_score_std=float(raw.std()) if len(raw) > 1 else 0.0,
                       demos_scored=len(raw))
    metrics["reward_offset"] = offset
    return metrics, offset, head, shared.info


def warn_if_at_chance(metrics: dict[str, Any], log: Any) -> None:
    """Say loudly (train.log and the console) when the run ended where a model that cannot tell chosen from rejected
    is: held-out pairwise accuracy whose interval reaches 50 %, or, without held-out pairs, a last training loss
    at ln 2 or above. Such a model is complete on disk, but PPO would follow noise. Sets metrics["at_chance"]."""
    import logging
    import math

    if metrics.get("eval_pairwise_accuracy_low") is not None:
        at_chance = metrics["eval_pairwise_accuracy_low"] <= 0.5
        evidence = (f"held-out pairwise accuracy {metrics['eval_pairwise_accuracy']:.1%} (95 % interval "
                    f"[{metrics['eval_pairwise_accuracy_low']:.1%}, {metrics['eval_pairwise_accuracy_high']:.1%}]) "
                    "does not exclude chance (50 %)")
    else:
        loss = metrics.get("last_logged_loss", metrics.get("train_loss"))
        at_chance = isinstance(loss, (int, float)) and loss >= math.log(2) - 0.01
        evidence = f"the training loss ended at {loss:.3f}, where ln 2 = 0.693 means no preference learned" \
            if at_chance else ""
    metrics["at_chance"] = at_chance
    if at_chance:
        message = (f"THE REWARD MODEL IS AT CHANCE: {evidence}. PPO against it would follow noise. Check the "
                   "comparisons (warnings above), then give it more of them, more epochs or a higher learning rate")
        for logger in (log, logging.getLogger(__name__)):  # train.log, and the console
            logger.warning(message)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
