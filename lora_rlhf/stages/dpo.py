"""Direct preference optimisation (Rafailov et al. 2023) from the reward model's comparisons, on the shared base.

DPO skips the reward model, the value function and generation: for a comparison (x, y_w, y_l) it minimises

    -log sigma(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

(`dpo.loss_type` swaps in IPO, hinge, robust DPO and the rest of TRL's losses; `dpo.beta` is beta). The comparisons
are the reward stage's: K-wise rankings (compare's, the labelling page's) as all K(K-1)/2 pairs of a prompt or
each best response against the rest (`dpo.pairs`, one pairing rule in stages/rankings.py), or TRL preference rows.

The policy is a LoRA adapter initialised as a copy of the SFT adapter (OUT/sft or dpo.sft_adapter); the reference
is that SFT adapter itself, frozen, on the SAME base, so one base copy holds both (no SFT: a fresh adapter, whose
copy is the bare base, since PEFT starts B at zero). TRL 1.16's DPOTrainer does exactly this when handed a
PeftModel that already holds a trained adapter and no ref_model: it copies the "default" adapter into a frozen
"ref" adapter and runs the reference forwards with it active. (Handed a plain model and a peft_config instead, its
reference would be the bare base with adapters disabled: wrong after SFT.) We train with DPOTrainer and write our
own code only where it cannot do what this stage needs:

- tokenisation: every comparison goes in as core.text tokenises it (the prompt through the chat template up to
  where the answer begins, the answer up to its end-of-turn token): the exact ids the reward model scores and PPO
  samples. TRL joins a string prompt and answer as plain text without the template, and for conversations keeps
  what the template appends after the end-of-turn token;
- pairs longer than max_length are dropped (as the reward stage drops them) rather than cut mid-answer;
- QLoRA adapters stay fp32 (TRL casts them to bf16), and the policy is copied back from the reference after that
  cast: otherwise step 0's policy is a bf16-rounded SFT adapter, not the SFT adapter;
- precomputed reference log-probs (`precompute_ref_log_probs`, our default) are kept in memory: TRL caches them in
  a file that, for an in-memory dataset, lies in a per-process temporary folder the other ranks cannot find.

setup (validate data and adapter, tokenise, load the base once) -> train with DPOTrainer -> save the policy.
Output as the other stages (docs/FORMATS.md): the adapter in plain PEFT format, tokenizer, recipe.yaml,
metrics.json, train.log; lora_rlhf.json written last. Checkpoints in OUT/dpo/checkpoints; resume=True continues.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lora_rlhf.core import distributed
from lora_rlhf.core.adapters import base_fingerprint, check_adapter_base, is_finished, recipe_adapter
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.loading import load_config, load_tokenizer
from lora_rlhf.core.logs import LogCallback, write_metrics
from lora_rlhf.core.text import encode, prompt_ids
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

REFERENCE = "ref"  # the name TRL's DPOTrainer gives its frozen copy of the trained adapter


# ---------------------------------------------------------------------------------------------------- data
def dpo_dataset_config(recipe: Recipe) -> DatasetConfig:
    """data.dpo, else data.reward (DPO learns from the same comparisons as the reward model)."""
    cfg = recipe.data.dpo or recipe.data.reward
    if cfg is None:
        raise DataError("the recipe has neither data.dpo nor data.reward, so DPO has no comparisons",
                        fix="add `data: {reward: {path: rankings.jsonl}}` (or data.dpo): rankings or "
                            "chosen/rejected preferences, see docs/FORMATS.md")
    return cfg


def load_dpo_data(recipe: Recipe) -> tuple[list[Comparison], list[Comparison] | None]:
    """(train, held-out or None) comparisons under `dpo.pairs`, held out by prompt line."""
    key = "data.dpo" if recipe.data.dpo is not None else "data.reward"
    return load_comparisons(dpo_dataset_config(recipe), recipe.seed, recipe.dpo.pairs, "DPO dataset", key)


def tokenize_pairs(comparisons: Sequence[Comparison], tokenizer: Any, max_length: int | None):
    """-> (datasets.Dataset with prompt_ids, chosen_ids, rejected_ids; number of pairs dropped as too long).

    prompt + answer is `core.text.encode` (the reward model's ids, ending at the end-of-turn token where generation
    stops) and the prompt is `core.text.prompt_ids` (what PPO and eval generate from). The answer starts where the
    two part ways: right after the prompt for every template that renders a prompt alike alone and before an answer.
    """
    import datasets

    prompts: dict[str, list[int]] = {}
    full: dict[tuple[str, str], list[int]] = {}

    def ids(prompt: Any, response: str) -> tuple[list[int], list[int]]:
        key = json.dumps(prompt)
        if key not in prompts:
            prompts[key] = prompt_ids(tokenizer, prompt)
        if (key, response) not in full:
            full[key, response] = encode(tokenizer, prompt, response)
        return prompts[key], full[key, response]

    rows: dict[str, list[Any]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "group": []}
    dropped = 0
    for c in comparisons:
        prompt, chosen = ids(c.prompt, c.chosen)
        rejected = ids(c.prompt, c.rejected)[1]
        if max_length is not None and max(len(chosen), len(rejected)) > max_length:
            dropped += 1
            continue
        start = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
        rows["prompt_ids"].append(chosen[:start])
        rows["chosen_ids"].append(chosen[start:])
        rows["rejected_ids"].append(rejected[start:])
        rows["group"].append(c.group)
    return datasets.Dataset.from_dict(rows), dropped


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------- model
def sft_adapter_for(recipe: Recipe) -> Path | None:
    """dpo.sft_adapter, else OUT/sft when finished, else None; refused when missing or trained on another base."""
    source = recipe_adapter(recipe, "sft", recipe.dpo.sft_adapter)
    if source is None:
        return None
    folder = local_adapter(source)
    check_adapter_base(folder, {"name_or_path": recipe.model.name,
                                "fingerprint": base_fingerprint(load_config(recipe.model))})
    return folder


def dpo_training_args(recipe: Recipe, out: Path, eval_present: bool):
    from trl import DPOConfig

    return DPOConfig(**trainer_args(recipe, "dpo", out, eval_present))


def _trainer_class():
    from trl import DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on rows tokenised by `tokenize_pairs`, with the reference log-probs precomputed in memory."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset  # TRL would tokenise prompt and answers again, its way

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            # TRL caches the reference log-probs in a file beside the dataset; an in-memory dataset's goes to a
            # per-process temporary folder, so under several ranks every rank but 0 then opens a file that does not
            # exist (FileNotFoundError under torchrun). The same forwards, kept in memory: a few floats per pair.
            loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                         collate_fn=self.data_collator))
            chosen, rejected = [], []
            # TRL's own pass shows a bar; minutes on a CPU must not look like a hang
            for batch in tqdm(loader, desc=f"reference log-probs ({name})", disable=not self.is_local_process_zero()):
                logps = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(self.model, batch))
                chosen.append(logps[0].float().cpu())
                rejected.append(logps[1].float().cpu())
            return (dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
                    .add_column("ref_rejected_logps", torch.cat(rejected).tolist()))

    return TokenizedDPOTrainer


def build_trainer(shared: SharedBase, args: Any, train_ds: Any, eval_ds: Any = None,
                  callbacks: Sequence[Any] = ()) -> Any:
    """DPOTrainer on the shared base, whose `default` adapter (the policy) holds the SFT weights or a fresh LoRA.

    TRL copies it into the frozen `ref` adapter (the reference); we check it did, keep the adapters fp32 and put
    the exact reference weights back into the policy after TRL's bf16 cast.
    """
    trainer = _trainer_class()(model=shared.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                               processing_class=shared.tokenizer, callbacks=list(callbacks))
    shared.keep_adapters_in_fp32()
    copy_reference_into_policy(shared.model)
    return trainer


def copy_reference_into_policy(model: Any) -> None:
    """Set every LoRA weight of the policy (`default`) to its reference (`ref`) copy.

    The copy TRL made before casting the policy to bf16 is the SFT adapter exactly; the policy must start there
    (its log-ratio to the reference is then 0 at step 0). A missing `ref` adapter would mean TRL disabled the
    adapters for its reference, i.e. used the bare base: refused rather than trained against the wrong reference.
    """
    if REFERENCE not in getattr(model, "peft_config", {}):
        raise ModelError("TRL's DPOTrainer made no frozen 'ref' copy of the SFT adapter, so its reference would be "
                         "the bare base", fix="install the TRL version lora-rlhf pins (trl 1.16)")
    params = dict(model.named_parameters())
    policy = {n: p for n, p in params.items() if f".{ADAPTER}." in n and "lora_" in n}
    with torch.no_grad():
        for name, p in policy.items():
            reference = params.get(name.replace(f".{ADAPTER}.", f".{REFERENCE}."))
            if reference is None:
                raise ModelError(f"TRL's 'ref' adapter has no counterpart of policy weight '{name}'")
            p.data = reference.detach().clone().to(torch.float32)


# ---------------------------------------------------------------------------------------------------- run
def run(recipe: Recipe, *, resume: bool | None = None) -> StageResult:
    """The stage (stages/stage.py): train the DPO policy described by `recipe` into OUT/dpo."""
    return _train_dpo(recipe, bool(resume))[0]


def is_complete(recipe: Recipe) -> bool:
    return is_finished(recipe.stage_dir("dpo"))


def run_dpo(recipe: Recipe, resume: bool = False) -> Path:
    """Train the DPO policy described by `recipe`; return its output folder (OUT/dpo)."""
    return run(recipe, resume=resume).output


def train_dpo(recipe: Recipe, resume: bool = False) -> tuple[Path, SharedBase]:
    """`run_dpo`, also returning the shared base (policy `default` and reference `ref`) for callers that inspect it."""
    result, shared = _train_dpo(recipe, resume)
    return result.output, shared


def _train_dpo(recipe: Recipe, resume: bool) -> tuple[StageResult, SharedBase]:
    out = recipe.stage_dir("dpo")
    distributed.configure(recipe)
    # --- setup: everything that can fail on user input fails here, before anything is written
    train, held_out = load_dpo_data(recipe)
    sft = sft_adapter_for(recipe)
    tokenizer = load_tokenizer(recipe.model)
    args = dpo_training_args(recipe, out, held_out is not None)
    train_ds, dropped = tokenize_pairs(train, tokenizer, args.max_length)
    eval_ds = tokenize_pairs(held_out, tokenizer, args.max_length)[0] if held_out else None
    if eval_ds is not None and len(eval_ds) == 0:
        from transformers.trainer_utils import IntervalStrategy

        eval_ds, args.eval_strategy = None, IntervalStrategy.NO  # every held-out pair is longer than max_length
    if len(train_ds) == 0:
        raise DataError(f"all {len(train)} training comparisons are longer than dpo.max_length={args.max_length}",
                        fix="raise dpo.max_length, or shorten the prompts/responses")
    longest = max(len(p) + len(r) for column in ("chosen_ids", "rejected_ids")
                  for p, r in zip(train_ds["prompt_ids"], train_ds[column], strict=True))
    memory = check_memory(recipe, "dpo", sequence_length=longest)
    shared = SharedBase.load(recipe.model, recipe.quantization, tokenizer=tokenizer)
    torch.manual_seed(recipe.seed)  # a fresh adapter's init follows from the recipe, not from what ran before it
    if sft is not None:
        shared.load_adapter(ADAPTER, sft, trainable=True)
    else:
        shared.add_adapter(ADAPTER, recipe.lora, trainable=True)
    checkpoint = last_checkpoint(out) if resume else None
    with stage_outputs(out, "dpo", resume) as (log, main):
        if main:
            save_recipe(recipe, out / "recipe.yaml")
        log.info("DPO: %d train / %d held-out pairs (%s pairs of each ranking; %d dropped as longer than %s tokens), "
                 "policy and reference from %s, base %s (%s), resume from %s", len(train_ds),
                 0 if eval_ds is None else len(eval_ds), recipe.dpo.pairs, dropped, args.max_length,
                 sft or "a fresh adapter (reference: the bare base)", recipe.model.name, recipe.quantization.mode,
                 checkpoint)
        metrics = _train(shared, args, train_ds, eval_ds, checkpoint, log)
        metrics.update(pairs=recipe.dpo.pairs, pairs_dropped_too_long=dropped, reference=str(sft) if sft else "base",
                       **memory.metrics())
        # --- save (rank 0): adapter + tokenizer + metadata last
        if main:
            write_metrics(out, metrics)
            shared.save_adapter(ADAPTER, out, stage="dpo")
        log.info("DPO done: %s", {k: metrics.get(k) for k in (
            "train_loss", "eval_rewards/accuracies", "eval_rewards/margins", "wall_seconds", "memory/peak_gb",
            "memory/predicted_gb")})
    return StageResult("dpo", out, metrics), shared


def _train(shared: SharedBase, args: Any, train_ds: Any, eval_ds: Any, checkpoint: str | None,
           log: Any) -> dict[str, Any]:
    callback = LogCallback(log)
    trainer = build_trainer(shared, args, train_ds, eval_ds, [callback, RecipeStepsOnResume(log)])
    # --- train (Ctrl-C propagates: the newest checkpoint stays on disk for --resume)
    started = time.perf_counter()
    result = run_trainer(trainer, checkpoint)
    metrics: dict[str, Any] = {**result.metrics, "wall_seconds": time.perf_counter() - started,
                               "global_step": result.global_step, "resumed_from": checkpoint,
                               "train_pairs": len(train_ds), "world_size": distributed.world_size(),
                               "precompute_ref_log_probs": args.precompute_ref_log_probs,
                               **loss_summary(callback.history)}
    if eval_ds is not None:
        metrics.update(callback.final_eval(trainer))
        metrics["eval_pairs"] = len(eval_ds)
    return metrics
