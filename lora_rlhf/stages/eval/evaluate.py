"""`lora-rlhf eval`: what each stage changed, measured on held-out prompts (the paper's section 4).

For every policy (the bare base, OUT/sft, OUT/<stage>/policy such as PPO and PPO-ptx, OUT/dpo, or those named
with --policy), on the held-out prompts of `data.eval`:

    1. sample one response per prompt (same seed for every policy)
    2. task score      `eval.labeler` (module:function, e.g. constraint compliance), all policies' responses
                       to one prompt judged in one call
    3. RM score        the reward adapter (OUT/reward), minus its reward_offset: SFT demonstrations score ~0
    4. KL to reference mean over responses of sum_t log pi(y_t|x,y<t) - log pi_ref(y_t|x,y<t), by teacher
                       forcing on the policy's own samples; the reference is the SFT adapter (or the bare base)
    5. length          response tokens
    6. win rates       every later policy against every earlier one (PPO vs SFT, PPO vs base, ...), judged by
                       the labeler and by the RM; a tie counts half (the paper's "preferred 85 +- 3 % of the time")
    7. alignment tax   perplexity on held-out general text (`eval.general_text`)

The base is loaded once; each policy is its own named adapter on it. Writes OUT/eval/{results.json,
responses.jsonl, report.md, *.png}. KL uses logits divided by the sampling temperature, i.e. the distribution
the responses were drawn from (as PPO's penalty does); top_p truncation is ignored.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_rlhf.core import distributed
from lora_rlhf.core.adapters import is_finished, recipe_adapter
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.data import check_text_or_messages, load_table, require_columns
from lora_rlhf.core.generation import answer_text, generate_ids
from lora_rlhf.core.loading import load_tokenizer
from lora_rlhf.core.logprobs import token_logprobs
from lora_rlhf.core.logs import METRICS_FILE
from lora_rlhf.core.plugins import load_callable
from lora_rlhf.core.scoring import score_texts
from lora_rlhf.core.stats import bootstrap_interval
from lora_rlhf.core.text import batches, longest_prompt
from lora_rlhf.errors import DataError, ModelError, RecipeError
from lora_rlhf.hub.client import local_adapter
from lora_rlhf.recipe.config import DatasetConfig, EvalSection, Recipe
from lora_rlhf.stages.eval.report import RESULTS, write_report
from lora_rlhf.stages.labelers import function_labeler
from lora_rlhf.stages.memory import check_memory
from lora_rlhf.stages.stage import StageResult

EVAL_DIR = "eval"
RESULTS_FILE = RESULTS  # written last: its presence marks a finished evaluation
BARE_BASE = ("base", "none")  # --policy NAME=base: the base model without any adapter


@dataclass
class Policy:
    name: str
    adapter: Path | None  # None: the bare base
    metrics: Path | None = None  # training curves (OUT/<stage>/metrics.jsonl) when there are any


@dataclass
class WinRate:
    """`policy` against `baseline` over n prompts: a win scores 1, a tie 1/2."""

    policy: str
    baseline: str
    judge: str
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.n if self.n else float("nan")

    @property
    def stderr(self) -> float:
        p = self.rate
        return math.sqrt(p * (1 - p) / self.n) if self.n else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "baseline": self.baseline, "judge": self.judge, "wins": self.wins,
                "ties": self.ties, "losses": self.losses, "n": self.n, "win_rate": self.rate,
                "stderr": self.stderr}


def win_rate(policy_scores: Sequence[float], baseline_scores: Sequence[float], policy: str = "a",
             baseline: str = "b", judge: str = "labeler", tol: float = 1e-9) -> WinRate:
    """Pairwise comparison of two policies' scores on the same prompts (|difference| <= tol is a tie)."""
    if len(policy_scores) != len(baseline_scores):
        raise ValueError(f"{len(policy_scores)} scores against {len(baseline_scores)}")
    wins = sum(1 for a, b in zip(policy_scores, baseline_scores, strict=True) if a - b > tol)
    losses = sum(1 for a, b in zip(policy_scores, baseline_scores, strict=True) if b - a > tol)
    return WinRate(policy, baseline, judge, wins, len(policy_scores) - wins - losses, losses)


def paired_difference(policy_scores: Sequence[float], baseline_scores: Sequence[float], policy: str = "a",
                      baseline: str = "b", judge: str = "labeler", n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Any]:
    """Mean over prompts of (policy - baseline) score, with a percentile bootstrap interval over prompts.

    The two policies answered the same prompts, so the prompt-to-prompt spread cancels in the difference; the
    bootstrap (core.stats.bootstrap_interval) resamples prompts with replacement (n_boot times, seeded). An interval
    above 0 says the policy is better on prompts like these, beyond sampling luck.
    """
    diffs = torch.tensor([a - b for a, b in zip(policy_scores, baseline_scores, strict=True)], dtype=torch.float64)
    if len(diffs) == 0:
        return {"policy": policy, "baseline": baseline, "judge": judge, "n": 0, "mean": None, "low": None,
                "high": None, "level": level}
    low, high = bootstrap_interval(diffs, n_boot=n_boot, seed=seed, level=level)  # [P]: one group per prompt
    return {"policy": policy, "baseline": baseline, "judge": judge, "n": len(diffs), "mean": float(diffs.mean()),
            "low": low, "high": high, "level": level}


def reward_model_accuracy(folder: Path | None) -> dict[str, Any] | None:
    """The reward stage's held-out pairwise accuracy and its interval (from its metrics.json), when it has one."""
    metrics_file = Path(folder) / METRICS_FILE if folder else None
    if metrics_file is None or not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    if metrics.get("eval_pairwise_accuracy_low") is None:
        return None
    return {k: metrics[f"eval_pairwise_{k}"] for k in ("accuracy", "accuracy_low", "accuracy_high")} | {
        "pairs": metrics.get("eval_pairs"), "prompts": metrics.get("eval_prompts")}


# ---------------------------------------------------------------------------------------------- policies
def discover_policies(recipe: Recipe) -> list[Policy]:
    """base, then OUT/sft, then every OUT/<stage>/policy (ppo, ppo-ptx, ...), then OUT/dpo: those complete. Later
    policies are compared with every earlier one, so DPO's row is paired with SFT's and PPO's."""
    out = Path(recipe.output_dir)
    policies = [Policy("base", None)]
    if is_finished(out / "sft"):
        policies.append(Policy("sft", out / "sft", _metrics_file(out / "sft")))
    if out.is_dir():
        stages = sorted(p for p in out.iterdir() if p.is_dir() and is_finished(p / "policy"))
        for stage in sorted(stages, key=lambda p: (p.name != "ppo", p.name)):
            policies.append(Policy(stage.name, stage / "policy", _metrics_file(stage)))
    if is_finished(out / "dpo"):
        policies.append(Policy("dpo", out / "dpo"))
    return policies


def _metrics_file(folder: Path) -> Path | None:
    path = folder / "metrics.jsonl"
    return path if path.is_file() else None


def parse_policy_args(items: Sequence[str]) -> list[Policy]:
    """["sft=runs/x/sft", "base=base"] -> policies; ADAPTER `base` or `none` is the bare base."""
    policies, problems, names = [], [], set()
    for item in items:
        name, sep, adapter = item.partition("=")
        name, adapter = name.strip(), adapter.strip()
        if not sep or not name or not adapter:
            problems.append(f"--policy '{item}' must look like NAME=ADAPTER_FOLDER (or NAME=base for the bare base)")
            continue
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            problems.append(f"--policy name '{name}' may use only letters, digits and _ . + -")
        if name in names:
            problems.append(f"--policy name '{name}' is given twice")
        names.add(name)
        if adapter.lower() in BARE_BASE:
            policies.append(Policy(name, None))
        else:
            folder = Path(adapter).expanduser()
            stage_metrics = _metrics_file(folder.parent) if folder.name == "policy" else _metrics_file(folder)
            policies.append(Policy(name, folder, stage_metrics))
    if problems:
        raise RecipeError(problems, "--policy")
    return policies


# ---------------------------------------------------------------------------------------------- data
def load_eval_prompts(cfg: DatasetConfig | None, seed: int) -> tuple[list[Any], list[str] | None]:
    """(prompts, split kinds or None): a `prompt` column, and an optional `split_kind` column to group by."""
    if cfg is None:
        raise DataError("the recipe has no data.eval section, so there are no held-out prompts to evaluate on",
                        fix="add `data: {eval: {path: prompts_eval.jsonl}}` with a `prompt` column "
                            "(prompts never used in training)")
    ds = load_table(cfg, seed, what="eval prompts")
    require_columns(ds, {"prompt": ("prompt",)}, "eval prompts", cfg.path)
    check_text_or_messages(ds, "prompt", cfg.path)
    kinds = [str(k) for k in ds["split_kind"]] if "split_kind" in ds.column_names else None
    return list(ds["prompt"]), kinds


def load_general_text(path: str, limit: int) -> list[str]:
    ds = load_table(DatasetConfig(path=path), what="eval.general_text")
    require_columns(ds, {"text": ("text",)}, "eval.general_text", path)
    check_text_or_messages(ds, "text", path, allow_messages=False)
    return list(ds["text"])[:limit]


# ---------------------------------------------------------------------------------------------- log-probs
@torch.no_grad()
def sequence_logprobs(shared: SharedBase, role: str | None, sequences: Sequence[list[int]],
                      starts: Sequence[int], temperature: float = 1.0, batch_size: int = 8) -> list[torch.Tensor]:
    """Teacher forcing: for each sequence, log p(token_t | tokens_<t) for t >= starts[i] -> tensor [len - start].

    `role` None is the bare base. Logits are divided by `temperature` (> 0) first.

    The LM head runs one sequence at a time on the positions that are scored (where the architecture allows:
    SharedBase.lm_head): the batch never holds [B, T, vocab] logits (805 MB for 16 x 256 tokens of a 49k
    vocabulary, 2.1 GB with Llama 3's), only one sequence's [T, vocab].
    """
    out: list[torch.Tensor] = [torch.zeros(0)] * len(sequences)
    temperature = temperature if temperature > 0 else 1.0
    with shared.use(role) as model:
        was_training = model.training
        model.eval()  # LoRA dropout off
        head = shared.lm_head()
        try:
            for rows, ids, mask in batches(sequences, batch_size, shared.tokenizer.pad_token_id, shared.device):
                if head is None:
                    logits = model(input_ids=ids, attention_mask=mask).logits.float()
                else:
                    hidden = shared.backbone()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                for r, i in enumerate(rows):
                    start, end = max(starts[i], 1), len(sequences[i])
                    # positions start-1 .. end-2 predict tokens start .. end-1: [n, V]
                    row = logits[r, start - 1:end - 1] if head is None else head(hidden[r, start - 1:end - 1]).float()
                    out[i] = token_logprobs(row / temperature, ids[r, start:end]).cpu()
        finally:
            model.train(was_training)
    return out


def kl_to_reference(shared: SharedBase, role: str | None, ref_role: str | None, sequences: Sequence[list[int]],
                    starts: Sequence[int], temperature: float, batch_size: int) -> list[float]:
    """Per sampled sequence (prompt ids + the response ids generated after `starts[i]`): the sum over its
    response tokens of log pi(y|x) - log pi_ref(y|x) (k1; averages to KL(pi || pi_ref))."""
    if role == ref_role:
        return [0.0] * len(sequences)
    logp = sequence_logprobs(shared, role, sequences, starts, temperature, batch_size)
    ref = sequence_logprobs(shared, ref_role, sequences, starts, temperature, batch_size)
    return [float((a - b).sum()) for a, b in zip(logp, ref, strict=True)]


def perplexity(shared: SharedBase, role: str | None, texts: Sequence[str], batch_size: int = 8,
               max_tokens: int | None = None) -> float:
    """exp(mean negative log-likelihood per predicted token) over `texts` (each cut to max_tokens when given).

    Under a launcher each rank scores its share of the texts and every rank returns the perplexity of all.
    """
    mine = [texts[i] for i in distributed.shard(len(texts))]
    sequences = [shared.tokenizer(t, truncation=max_tokens is not None, max_length=max_tokens)["input_ids"]
                 for t in mine]
    logp = sequence_logprobs(shared, role, sequences, [1] * len(sequences), 1.0, batch_size)
    parts = distributed.gather_objects((float(sum(x.sum() for x in logp)), sum(len(x) for x in logp)))
    total, tokens = sum(p[0] for p in parts), sum(p[1] for p in parts)
    if tokens == 0:
        return float("nan")
    return math.exp(-total / tokens)


# ---------------------------------------------------------------------------------------------- labeler
def labeler_scores(spec: str, prompts: Sequence[Any], responses_by_policy: dict[str, list[str]]) -> dict[str, list[float]]:
    """Judge all policies' responses to a prompt in one call; ranks (1 = best) become (K - rank) / (K - 1)."""
    judge = function_labeler(spec)
    names = list(responses_by_policy)
    scores: dict[str, list[float]] = {n: [] for n in names}
    for i, prompt in enumerate(prompts):
        responses = [responses_by_policy[n][i] for n in names]
        judgement = judge(prompt, responses)
        if "scores" in judgement:
            values = judgement["scores"]
        else:
            k = len(responses)
            values = [(k - r) / (k - 1) if k > 1 else 1.0 for r in judgement["ranks"]]
        for n, v in zip(names, values, strict=True):
            scores[n].append(float(v))
    return scores


# ---------------------------------------------------------------------------------------------- results
@dataclass
class PolicyResult:
    """One policy's measurements on the held-out prompts, per prompt in prompt order (every rank holds them all)."""

    name: str
    adapter: Path | None
    responses: list[str]
    lengths: list[int]  # response tokens
    kl: list[float]  # sum over the response's tokens of log pi(y|x) - log pi_ref(y|x)
    rm_scores: list[float] | None = None  # the reward model's, its offset taken off
    task_scores: list[float] | None = None  # eval.labeler's
    task_by_split: dict[str, float | None] | None = None  # mean task score per split_kind of the prompts
    perplexity: float | None = None  # on eval.general_text
    seconds: dict[str, float] = field(default_factory=dict)  # per phase

    def scores(self, judge: str) -> list[float] | None:
        """The per-prompt scores `judge` ("labeler" or "reward model") gave, or None when it did not judge."""
        return self.task_scores if judge == "labeler" else self.rm_scores

    def summary(self) -> dict[str, Any]:
        """results.json's entry: the means of what was measured (nothing for what was not)."""
        out: dict[str, Any] = {"adapter": str(self.adapter) if self.adapter else None, "length": _mean(self.lengths),
                               "kl": _mean(self.kl)}
        if self.rm_scores is not None:
            out["rm_score"] = _mean(self.rm_scores)
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
        if self.task_scores is not None:
            out["task_score"] = _mean(self.task_scores)
            if self.task_by_split is not None:
                out["task_score_by_split"] = self.task_by_split
        return out

    def row(self, i: int) -> dict[str, Any]:
        """responses.jsonl's entry for prompt `i`."""
        entry: dict[str, Any] = {"response": self.responses[i], "kl": self.kl[i]}
        for label, values in (("task_score", self.task_scores), ("rm_score", self.rm_scores)):
            if values is not None:
                entry[label] = values[i]
        return entry


@dataclass
class EvalResult:
    policies: dict[str, dict[str, Any]]
    win_rates: list[WinRate]
    settings: dict[str, Any]
    paired: list[dict[str, Any]] = field(default_factory=list)  # paired differences with bootstrap intervals
    responses: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, str] = field(default_factory=dict)  # policy -> metrics.jsonl

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "policies": self.policies,
                "win_rates": [w.as_dict() for w in self.win_rates], "paired": self.paired, "curves": self.curves}


class _Clock:
    """Seconds spent per phase, for the log and results.json (where does evaluation time go)."""

    def __init__(self) -> None:
        self.last = time.time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.time()
        self.laps[name] = round(now - self.last, 1)
        self.last = now


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


# ---------------------------------------------------------------------------------------------- phases
@dataclass
class EvalInputs:
    """What an evaluation reads, checked before a model loads: the prompts (and their split kinds), the policies,
    the KL reference and the reward model (folders, None: the bare base / no reward model), the general texts."""

    prompts: list[Any]
    kinds: list[str] | None
    policies: list[Policy]
    reference: Path | None
    reward: Path | None
    general: list[str] | None


def eval_inputs(recipe: Recipe, policies: list[Policy] | None) -> EvalInputs:
    """Every check that can fail on user input, before the model loads or anything is written."""
    cfg = recipe.eval
    prompts, kinds = load_eval_prompts(recipe.data.eval, recipe.seed)
    policies = policies if policies is not None else discover_policies(recipe)
    if not policies:
        raise RecipeError(["no policy to evaluate"], "--policy")
    for p in policies:
        if p.adapter is not None:
            p.adapter = local_adapter(p.adapter)
    ref_source = recipe_adapter(recipe, "sft", recipe.ppo.sft_adapter)
    rm_source = recipe_adapter(recipe, "reward", recipe.ppo.reward_adapter)
    general = load_general_text(cfg.general_text, cfg.general_max_texts) if cfg.general_text else None
    if cfg.labeler:
        load_callable(cfg.labeler, what="eval.labeler")
    return EvalInputs(prompts, kinds, policies, local_adapter(ref_source) if ref_source else None,
                      local_adapter(rm_source) if rm_source else None, general)


def load_roles(shared: SharedBase, inputs: EvalInputs) -> tuple[dict[str, str | None], str | None]:
    """Each adapter once on the base (a folder used twice, e.g. sft as policy and reference, is shared), and the
    reward model as role `reward`. -> (role of each policy, role of the reference); None is the bare base."""
    roles: dict[Path, str] = {}

    def role_for(folder: Path | None) -> str | None:
        if folder is None:
            return None
        key = folder.resolve()
        if key not in roles:
            roles[key] = f"eval_{len(roles)}"
            meta = shared.load_adapter(roles[key], folder, trainable=False)
            if meta.get("head") is not None and meta.get("role") == "reward":
                raise ModelError(f"'{folder}' is a reward adapter, not a policy",
                                 fix="give policy adapters (OUT/sft, OUT/ppo/policy) to --policy")
        return roles[key]

    policy_roles = {p.name: role_for(p.adapter) for p in inputs.policies}
    reference = role_for(inputs.reference)
    if inputs.reward is not None:
        shared.load_adapter("reward", inputs.reward, trainable=False)
        if "reward" not in shared.heads:
            raise ModelError(f"reward adapter '{inputs.reward}' has no scalar head (head.safetensors)",
                             fix="point ppo.reward_adapter at the output folder of `lora-rlhf reward`")
    return policy_roles, reference


def measure_policy(shared: SharedBase, policy: Policy, role: str | None, ref_role: str | None, inputs: EvalInputs,
                   cfg: EvalSection, seed: int) -> PolicyResult:
    """Steps 1, 3, 4, 5 and 7 for one policy. Under a launcher each rank takes its contiguous share of the prompts;
    the per-prompt results are gathered in prompt order, so every rank holds them all."""
    clock = _Clock()
    mine = [inputs.prompts[i] for i in distributed.shard(len(inputs.prompts))]
    torch.manual_seed(seed)  # the same seed for every policy
    samples = [per_prompt[0] for per_prompt in generate_ids(
        shared, mine, role, cfg.max_new_tokens, cfg.temperature, cfg.top_p, 1, batch_size=cfg.batch_size)]
    my_responses = [answer_text(shared.tokenizer, answer) for _, answer in samples]
    result = PolicyResult(policy.name, policy.adapter, distributed.gather_shards(my_responses),
                          distributed.gather_shards([len(a) for _, a in samples]), [])
    clock.lap("generate")
    # KL and length on the ids that were sampled, never on re-tokenised text.
    sequences, starts = [q + a for q, a in samples], [len(q) for q, _ in samples]
    result.kl = distributed.gather_shards(
        kl_to_reference(shared, role, ref_role, sequences, starts, cfg.temperature, cfg.batch_size))
    clock.lap("kl")
    if inputs.reward is not None:
        result.rm_scores = distributed.gather_shards(
            score_texts(shared, mine, my_responses, batch_size=cfg.batch_size).cpu().tolist())
        clock.lap("rm")
    if inputs.general is not None:
        result.perplexity = perplexity(shared, role, inputs.general, cfg.batch_size, cfg.general_max_tokens)
        clock.lap("perplexity")
    result.seconds = clock.laps
    return result


def judge_tasks(spec: str, prompts: Sequence[Any], kinds: Sequence[str] | None, results: list[PolicyResult]) -> None:
    """Step 2: the labeler's task scores of every policy's responses (all policies' answers to a prompt in one
    call), and their mean per split kind."""
    scores = labeler_scores(spec, prompts, {r.name: r.responses for r in results})
    for r in results:
        r.task_scores = scores[r.name]
        if kinds is not None:
            r.task_by_split = {k: _mean([v for v, kk in zip(r.task_scores, kinds, strict=True) if kk == k])
                               for k in sorted(set(kinds))}


def compare_policies(results: list[PolicyResult], seed: int) -> tuple[list[WinRate], list[dict[str, Any]]]:
    """Step 6: each later policy against each earlier one, by every judge that scored them (labeler, reward model):
    win rates and paired differences."""
    judges = [j for j in ("labeler", "reward model") if results[0].scores(j) is not None]
    pairs = [(judge, a, b) for judge in judges for i, a in enumerate(results) for b in results[:i]]
    wins = [win_rate(a.scores(judge), b.scores(judge), a.name, b.name, judge) for judge, a, b in pairs]
    paired = [paired_difference(a.scores(judge), b.scores(judge), a.name, b.name, judge, seed=seed)
              for judge, a, b in pairs]
    return wins, paired


def response_rows(inputs: EvalInputs, results: list[PolicyResult]) -> list[dict[str, Any]]:
    """responses.jsonl: per prompt, every policy's response with its scores."""
    return [{"prompt": prompt, **({"split_kind": inputs.kinds[i]} if inputs.kinds else {}),
             **{r.name: r.row(i) for r in results}} for i, prompt in enumerate(inputs.prompts)]


# ---------------------------------------------------------------------------------------------- run
def run(recipe: Recipe, *, resume: bool | None = None, policies: list[Policy] | None = None,
        out_dir: str | Path | None = None, log: Callable[[str], None] = print) -> StageResult:
    """The stage (stages/stage.py): `run_eval`; metrics: results.json's content."""
    result, out = run_eval(recipe, policies, out_dir, log)
    return StageResult("eval", out, result.as_dict())


def is_complete(recipe: Recipe) -> bool:
    return (recipe.stage_dir(EVAL_DIR) / RESULTS_FILE).is_file()


def run_eval(recipe: Recipe, policies: list[Policy] | None = None, out_dir: str | Path | None = None,
             log: Callable[[str], None] = lambda _: None) -> tuple[EvalResult, Path]:
    """Evaluate `policies` (default: discovered from OUT) on data.eval; write OUT/eval; return (result, folder)."""
    cfg = recipe.eval
    distributed.configure(recipe)
    inputs = eval_inputs(recipe, policies)
    out = Path(out_dir) if out_dir is not None else recipe.stage_dir(EVAL_DIR)

    # --- load the base once, each adapter once
    tokenizer = load_tokenizer(recipe.model)
    memory = check_memory(recipe, "eval", prompt_length=longest_prompt(tokenizer, inputs.prompts))
    t0 = time.time()
    shared = SharedBase.load(recipe.model, recipe.quantization, for_training=False, tokenizer=tokenizer)
    policy_roles, ref_role = load_roles(shared, inputs)
    adapters = len((set(policy_roles.values()) | {ref_role}) - {None}) + (inputs.reward is not None)
    log(f"loaded the base and {adapters} adapter(s) in {time.time() - t0:.0f}s")

    # --- measure each policy, judge, compare
    results = []
    for p in inputs.policies:
        results.append(measure_policy(shared, p, policy_roles[p.name], ref_role, inputs, cfg, recipe.seed))
        laps = results[-1].seconds
        log(f"{p.name}: {len(inputs.prompts)} responses scored in {sum(laps.values()):.0f}s "
            f"({', '.join(f'{k} {v:.0f}s' for k, v in laps.items())})")
    if cfg.labeler:
        judge_tasks(cfg.labeler, inputs.prompts, inputs.kinds, results)
    wins, paired = compare_policies(results, recipe.seed)

    # --- write (rank 0)
    settings = {"eval_prompts": len(inputs.prompts), "reference": str(inputs.reference or "base"),
                "reward_adapter": str(inputs.reward) if inputs.reward else None,
                "reward_model_accuracy": reward_model_accuracy(inputs.reward), "labeler": cfg.labeler,
                "general_text": cfg.general_text, "general_texts": len(inputs.general) if inputs.general else 0,
                "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "seed": recipe.seed, "world_size": distributed.world_size(),
                "seconds_per_policy": {r.name: r.seconds for r in results},
                "seconds_total": round(time.time() - t0, 1), **memory.metrics()}
    result = EvalResult({r.name: r.summary() for r in results}, wins, settings, paired, response_rows(inputs, results),
                        {p.name: str(p.metrics) for p in inputs.policies if p.metrics is not None})
    if distributed.is_main():
        write_report(out, result.as_dict(), result.responses, num_samples=cfg.num_samples)
    distributed.barrier("the end of eval (rank 0 writes the report)")
    return result, out
