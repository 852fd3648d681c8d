"""The evaluation report: OUT/eval/report.md (tables, plots, samples), results.json, responses.jsonl, PNGs.

Everything here works from plain data (the results dict and metrics.jsonl files), so a report can be rebuilt
or read by other tools without loading a model. A new report never deletes an earlier finished one: its files
move to OUT/eval/previous-N/ first.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from lora_rlhf.core.io import (
    clean_json,
    keep_previous,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
    writing,
)
from lora_rlhf.errors import DataError

REWARD_KEY, KL_KEY = "objective/scores", "objective/kl"  # PPO's metrics.jsonl fields (TRL's names)
GOLD_KEY, LENGTH_KEY = "objective/gold", "val/response_length"  # ppo.gold_fn's score; mean response tokens
RESULTS = "results.json"  # written last: its presence marks a finished evaluation
PLOTS = ("scores.png", "win_rates.png", "ppo_curves.png")
REPORT_FILES = ("responses.jsonl", "report.md", *PLOTS)  # what an evaluation writes besides RESULTS
log = logging.getLogger(__name__)

COLUMNS = [  # (key in a policy's results, header, format)
    ("task_score", "task score", "{:.3f}"),
    ("rm_score", "RM score", "{:+.3f}"),
    ("kl", "KL to ref (nats)", "{:.2f}"),
    ("length", "length (tokens)", "{:.1f}"),
    ("perplexity", "general-text ppl", "{:.2f}"),
]


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def policy_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per policy, one column per measured metric (unmeasured ones left out)."""
    policies: dict[str, dict[str, Any]] = results["policies"]
    columns = [c for c in COLUMNS if any(p.get(c[0]) is not None for p in policies.values())]
    splits = sorted({k for p in policies.values() for k in (p.get("task_score_by_split") or {})})
    header = ["policy"] + [c[1] for c in columns] + [f"task score ({s})" for s in splits]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, p in policies.items():
        cells = [name] + [_fmt(p.get(key), spec) for key, _, spec in columns]
        cells += [_fmt((p.get("task_score_by_split") or {}).get(s), "{:.3f}") for s in splits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: dict[str, Any]) -> str:
    rows = [d for d in results.get("paired") or [] if d.get("n")]
    if not rows:
        return "(no judge: set eval.labeler or train a reward model to compare policies prompt by prompt)"
    level = f"{100 * rows[0]['level']:.0f} %"
    lines = [f"| policy | vs | judge | mean difference | {level} bootstrap interval | prompts |", "|---|---|---|---|---|---|"]
    for d in rows:
        lines.append(f"| {d['policy']} | {d['baseline']} | {d['judge']} | {d['mean']:+.3f} | "
                     f"[{d['low']:+.3f}, {d['high']:+.3f}] | {d['n']} |")
    return "\n".join(lines)


def win_rate_table(results: dict[str, Any]) -> str:
    rows = results.get("win_rates") or []
    if not rows:
        return "(no judge: set eval.labeler or train a reward model to get win rates)"
    lines = ["| policy | vs | judge | win rate | wins / ties / losses |", "|---|---|---|---|---|"]
    for w in rows:
        rate = f"{100 * w['win_rate']:.0f} ± {100 * w['stderr']:.0f} %" if w["n"] else "-"
        lines.append(f"| {w['policy']} | {w['baseline']} | {w['judge']} | {rate} | "
                     f"{w['wins']} / {w['ties']} / {w['losses']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """A training run's metrics.jsonl (a last line cut short by a killed run left out). One that cannot be read is
    left out of the plots with a warning: the evaluation it ends is worth more than one curve."""
    try:
        return [row for _, row in read_jsonl(path, "metrics log", cut_short_tail=True) if isinstance(row, dict)]
    except DataError as e:
        log.warning("eval: %s: left out of the training curves", e.what)
        return []


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row.get("step", row.get("episode", i + 1)))
            ys.append(value)
    return xs, ys


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(curves: dict[str, str], path: Path) -> bool:
    """Reward and KL over PPO steps, one line per run, and, when a run logged a gold score (ppo.gold_fn), the
    reward model's score against the gold one with the response length: the picture of over-optimisation (Gao et al.
    2022), where the proxy keeps rising while the gold score stalls or falls. False (no file) when no run logged."""
    series = {name: read_metrics(p) for name, p in curves.items() if Path(p).is_file()}
    series = {n: rows for n, rows in series.items() if _series(rows, REWARD_KEY)[0] or _series(rows, KL_KEY)[0]}
    if not series:
        return False
    gold = any(_series(rows, GOLD_KEY)[0] for rows in series.values())
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3 if gold else 2, figsize=(15 if gold else 10, 3.6))
    for name, rows in series.items():
        for ax, key in zip(axes, (REWARD_KEY, KL_KEY), strict=False):
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker=".", label=name)
    axes[0].set(title="reward during PPO", xlabel="PPO step", ylabel=REWARD_KEY)
    axes[1].set(title="KL to the reference during PPO", xlabel="PPO step", ylabel=KL_KEY + " (nats)")
    if gold:
        ax, length_ax = axes[2], axes[2].twinx()
        for i, (name, rows) in enumerate(series.items()):
            color = f"C{i}"
            for key, style, target in ((REWARD_KEY, "-", ax), (GOLD_KEY, "--", ax), (LENGTH_KEY, ":", length_ax)):
                xs, ys = _series(rows, key)
                if xs:
                    label = {REWARD_KEY: "RM", GOLD_KEY: "gold", LENGTH_KEY: "length"}[key]
                    target.plot(xs, ys, style, color=color, marker="." if key != LENGTH_KEY else None,
                                label=f"{name} {label}")
        ax.set(title="reward model vs gold score (dotted: length)", xlabel="PPO step", ylabel="mean score")
        length_ax.set_ylabel("response tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def training_trends(curves: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    """Per PPO run: the mean of the first and of the last quarter of its steps for the reward, the gold score (when
    logged), the KL and the response length: {run: {key: [first, last]}}."""
    trends = {}
    for name, path in curves.items():
        if not Path(path).is_file():
            continue
        rows = read_metrics(path)
        run = {}
        for key in (REWARD_KEY, GOLD_KEY, KL_KEY, LENGTH_KEY):
            ys = _series(rows, key)[1]
            if ys:
                q = max(1, len(ys) // 4)
                run[key] = [sum(ys[:q]) / q, sum(ys[-q:]) / q]
        if run:
            trends[name] = run
    return trends


def plot_win_rates(win_rates: list[dict[str, Any]], path: Path) -> bool:
    rows = [w for w in win_rates if w["n"]]
    if not rows:
        return False
    plt = _pyplot()
    labels = [f"{w['policy']} vs {w['baseline']}\n({w['judge']})" for w in rows]
    rates = [100 * w["win_rate"] for w in rows]
    errors = [100 * 1.96 * w["stderr"] for w in rows]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.4))
    ax.barh(range(len(rows)), rates, xerr=errors, color="tab:blue", alpha=0.8, capsize=3)
    ax.axvline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="win rate (%, ties count half; bars: 95% interval)", title="head-to-head win rates")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_scores(policies: dict[str, dict[str, Any]], path: Path) -> bool:
    keys = [(k, h) for k, h, _ in COLUMNS if any(p.get(k) is not None for p in policies.values())]
    if not keys:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    names = list(policies)
    for ax, (key, header) in zip(axes[0], keys, strict=True):
        values = [policies[n].get(key) or 0.0 for n in names]
        ax.bar(names, values, color="tab:green", alpha=0.8)
        ax.set_title(header, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- report
def _sample_block(row: dict[str, Any], names: list[str]) -> str:
    prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
    lines = [f"**Prompt{' (' + row['split_kind'] + ')' if row.get('split_kind') else ''}:** {prompt}", ""]
    for name in names:
        entry = row[name]
        marks = ", ".join(f"{k.replace('_', ' ')} {entry[k]:.2f}" for k in ("task_score", "rm_score") if k in entry)
        text = entry["response"].replace("\n", "\n    ")
        lines.append(f"- *{name}*{' (' + marks + ')' if marks else ''}:\n\n    {text}\n")
    return "\n".join(lines)


NOTES = {
    "task_score": "- **task score**: mean of the labeler's score (for IFEval-lite: the fraction of constraints met).",
    "rm_score": "- **RM score**: reward model output minus its offset (SFT demonstrations average 0).",
    "kl": "- **KL to ref**: mean over responses of the sum over tokens of log pi(y|x) - log pi_ref(y|x), at the "
          "sampling temperature (as PPO's penalty).",
    "length": "- **length**: response tokens (a PPO policy that games its reward often writes longer).",
    "perplexity": "- **general-text ppl**: perplexity on held-out general text; a rise over the base is the "
                  "alignment tax",
}


def _metric_notes(policies: dict[str, dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    notes = [note for key, note in NOTES.items() if any(p.get(key) is not None for p in policies.values())]
    if any(p.get("perplexity") is not None for p in policies.values()):
        notes[-1] += f" ({settings['general_texts']} texts from `{settings['general_text']}`)."
    else:
        notes.append("- Alignment tax not measured: set eval.general_text to a held-out `text` file.")
    return notes


def summary(results: dict[str, Any]) -> list[str]:
    """One line per trained policy: task/RM score against the base and SFT, win rate vs SFT, perplexity change."""
    policies = results["policies"]
    baselines = [b for b in ("sft", "base") if b in policies]
    lines = []
    for name, p in policies.items():
        if name in ("base", "sft") or not baselines:
            continue
        parts = []
        for key, label in (("task_score", "task score"), ("rm_score", "RM score")):
            if p.get(key) is not None:
                others = ", ".join(f"{b} {policies[b][key]:.3f}" for b in baselines if policies[b].get(key) is not None)
                parts.append(f"{label} {p[key]:.3f}" + (f" ({others})" if others else ""))
        for d in results.get("paired") or []:
            if d["policy"] == name and d["baseline"] == baselines[0] and d["n"]:
                parts.append(f"{d['judge']} score {d['mean']:+.3f} vs {d['baseline']} per prompt "
                             f"({100 * d['level']:.0f} % interval [{d['low']:+.3f}, {d['high']:+.3f}])")
        for w in results.get("win_rates") or []:
            if w["policy"] == name and w["baseline"] == baselines[0] and w["n"]:
                parts.append(f"preferred to {w['baseline']} {100 * w['win_rate']:.0f} ± {100 * w['stderr']:.0f} % "
                             f"of the time ({w['judge']})")
        base_ppl = policies.get("base", {}).get("perplexity")
        if p.get("perplexity") is not None and base_ppl:
            parts.append(f"general-text perplexity {p['perplexity']:.2f} vs base {base_ppl:.2f} "
                         f"({100 * (p['perplexity'] / base_ppl - 1):+.0f} %)")
        if parts:
            lines.append(f"- **{name}**: " + "; ".join(parts) + ".")
    return lines


def _rm_accuracy(settings: dict[str, Any]) -> str:
    acc = settings.get("reward_model_accuracy")
    if not acc:
        return ""
    return (f" (orders {100 * acc['accuracy']:.1f} % of {acc['pairs']} held-out pairs from {acc['prompts']} prompts "
            f"correctly, 95 % interval [{100 * acc['accuracy_low']:.1f}, {100 * acc['accuracy_high']:.1f}] %)")


def _rm_line(settings: dict[str, Any]) -> list[str]:
    """The reward model's own held-out accuracy above the policies' table: a policy that followed a reward model at
    chance learned noise, whatever its row says."""
    acc = settings.get("reward_model_accuracy")
    if not acc:
        return []
    verdict = "better than chance" if acc["accuracy_low"] > 0.5 else "NOT distinguishable from chance (50 %)"
    return [f"The reward model the RL policies followed orders {100 * acc['accuracy']:.1f} % of {acc['pairs']} "
            f"held-out pairs from {acc['prompts']} prompts correctly (95 % interval [{100 * acc['accuracy_low']:.1f}, "
            f"{100 * acc['accuracy_high']:.1f}] %): {verdict}.", ""]


def during_ppo(curves: dict[str, str]) -> list[str]:
    """Markdown lines: each PPO run's reward, gold score, KL and length, first quarter of its steps -> last."""
    trends = training_trends(curves)
    if not trends:
        return []
    names = {REWARD_KEY: ("RM score", "{:.3f}"), GOLD_KEY: ("gold score", "{:.3f}"), KL_KEY: ("KL", "{:.2f}"),
             LENGTH_KEY: ("length (tokens)", "{:.1f}")}
    intro = "Mean over the first quarter of the PPO steps -> the last quarter, on the policy's own rollouts."
    if any(GOLD_KEY in keys for keys in trends.values()):
        intro += (" The gold score (ppo.gold_fn) is never optimised: when the RM score rises and the gold score does "
                  "not, the policy is exploiting the reward model.")
    lines = ["## During PPO", "", intro, ""]
    for run, keys in trends.items():
        parts = [f"{names[k][0]} {names[k][1].format(a)} -> {names[k][1].format(b)}" for k, (a, b) in keys.items()]
        lines.append(f"- **{run}**: " + "; ".join(parts) + ".")
    return lines + [""]


def render_markdown(results: dict[str, Any], plots: list[str], samples: list[dict[str, Any]]) -> str:
    s = results["settings"]
    parts = [
        "# Evaluation report", "",
        f"{s['eval_prompts']} held-out prompts, one sample each (temperature {s['temperature']}, top_p {s['top_p']}, "
        f"at most {s['max_new_tokens']} new tokens, seed {s['seed']}). "
        f"KL reference: `{s['reference']}`. Reward model: `{s['reward_adapter'] or 'none'}`{_rm_accuracy(s)}. "
        f"Task labeler: `{s['labeler'] or 'none'}`.", "",
        *(["## Summary", "", *summary(results), ""] if summary(results) else []),
        "## Policies", "", *_rm_line(s), policy_table(results), "",
        *_metric_notes(results["policies"], s),
        "", "## Paired differences", "",
        "Each later policy against each earlier one on the same prompts: the mean per-prompt difference of the "
        "judge's score, with a bootstrap interval over prompts (above 0: better beyond sampling luck).", "",
        paired_table(results), "",
        "## Win rates", "", win_rate_table(results), "",
        *during_ppo(results.get("curves") or {}),
    ]
    for png in plots:
        parts += [f"![{png}]({png})", ""]
    if samples:
        names = list(results["policies"])
        parts += ["## Samples", ""] + [_sample_block(r, names) for r in samples]
    parts += ["", f"Evaluated in {s['seconds_total']:.0f} s. Per-prompt responses and scores: `responses.jsonl`; "
              "every number: `results.json`."]
    return "\n".join(parts) + "\n"


def write_report(out: Path, results: dict[str, Any], responses: list[dict[str, Any]], num_samples: int = 5) -> Path:
    """Write responses.jsonl, the plots, report.md and results.json into `out`; return report.md.

    `results` is EvalResult.as_dict() (or a results.json read back). results.json goes last: its presence marks
    a finished evaluation (the pipeline skips the stage then). An earlier finished evaluation in `out` moves to
    `out/previous-N/` first, marker first: it is neither lost nor left beside this one's files should this write
    be cut short.
    """
    out.mkdir(parents=True, exist_ok=True)
    kept = keep_previous(out, RESULTS, REPORT_FILES)
    if kept is not None:
        log.warning("eval: the earlier evaluation (%s, report.md, ...) moved to %s: nothing is deleted", RESULTS, kept)
    for name in PLOTS:  # an unfinished earlier report's plots must not show in this one
        (out / name).unlink(missing_ok=True)
    results = clean_json(results)
    write_jsonl_atomic(out / "responses.jsonl", responses)
    plots = []
    for name, make in (("scores.png", lambda p: plot_scores(results["policies"], p)),
                       ("win_rates.png", lambda p: plot_win_rates(results["win_rates"], p)),
                       ("ppo_curves.png", lambda p: plot_training_curves(results["curves"], p))):
        with writing(out / name):  # matplotlib's failed write names no file
            if make(out / name):
                plots.append(name)
    report = out / "report.md"
    write_text_atomic(report, render_markdown(results, plots, responses[:num_samples]))
    write_json_atomic(out / RESULTS, results)  # last: it marks the stage finished
    return report
