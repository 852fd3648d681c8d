"""`lora-rlhf eval`: win-rate arithmetic, KL and perplexity by teacher forcing, the report and the CLI, on the
tiny model with hand-made adapters standing in for the SFT, PPO, PPO-ptx and reward stages."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import Stop, recipe_dict, write_jsonl
from typer.testing import CliRunner

from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.text import prompt_ids, response_ids
from lora_rlhf.errors import DataError, RecipeError
from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig, recipe_from_dict
from lora_rlhf.stages.eval.evaluate import (
    PolicyResult,
    compare_policies,
    discover_policies,
    kl_to_reference,
    paired_difference,
    parse_policy_args,
    perplexity,
    run_eval,
    sequence_logprobs,
    win_rate,
)
from lora_rlhf.stages.eval.report import plot_training_curves, plot_win_rates, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELER = "def judge(prompt, responses):\n    return [min(len(r) // 10, 3) for r in responses]\n"


def test_win_rate_counts_ties_as_half():
    # policy vs baseline per prompt: win, tie, loss, win, tie -> (2 wins + 2 ties / 2) / 5 = 0.6
    w = win_rate([1.0, 0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 0.5, 0.5], "ppo", "sft")
    assert (w.wins, w.ties, w.losses, w.n) == (2, 2, 1, 5)
    assert w.rate == pytest.approx(0.6)
    assert w.stderr == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    # All ties is exactly even; the comparison is antisymmetric.
    assert win_rate([1, 1], [1, 1]).rate == 0.5
    assert win_rate([0.0, 0.5, 1.0], [1.0, 0.5, 0.0]).rate + win_rate([1.0, 0.5, 0.0], [0.0, 0.5, 1.0]).rate == 1.0
    with pytest.raises(ValueError, match="3 scores against 2"):
        win_rate([1, 2, 3], [1, 2])


def test_policy_arguments():
    policies = parse_policy_args(["base=base", "mine=some/folder"])
    assert [(p.name, p.adapter) for p in policies] == [("base", None), ("mine", Path("some/folder"))]
    with pytest.raises(RecipeError, match="must look like NAME=ADAPTER") as e:
        parse_policy_args(["justafolder", "a=x", "a=y"])
    assert "given twice" in str(e.value)


# ---------------------------------------------------------------------------------------------- fixtures
def _save_adapter(shared: SharedBase, role: str, folder: Path, stage: str, seed: int, head: bool = False,
                  **extra) -> Path:
    """A LoRA with random (non-zero) B matrices, so that it really changes the model, saved like a stage."""
    shared.add_adapter(role, LoraSettings(r=4, alpha=8, dropout=0.0), trainable=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in shared.model.named_parameters():
            if f"lora_B.{role}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if head:
        shared.add_head(role)
    shared.save_adapter(role, folder, stage=stage, **extra)
    return folder


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """OUT with sft, ppo/policy (+ metrics.jsonl), ppo-ptx/policy and reward, plus eval data and a labeler."""
    root = tmp_path_factory.mktemp("eval-run")
    out = root / "run"
    shared = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"),
                             for_training=False)
    _save_adapter(shared, "sft", out / "sft", "sft", seed=1)
    _save_adapter(shared, "ppo", out / "ppo" / "policy", "ppo", seed=2)
    _save_adapter(shared, "ptx", out / "ppo-ptx" / "policy", "ppo", seed=3)
    _save_adapter(shared, "reward", out / "reward", "reward", seed=4, head=True, reward_offset=0.25)
    write_jsonl(out / "ppo" / "metrics.jsonl", [{"step": s, "objective/scores": 0.1 * s, "objective/kl": 0.5 * s}
                                                for s in range(1, 6)])
    prompts = [{"prompt": f"Describe topic number {i}. Avoid commas entirely.", "split_kind": k}
               for i, k in enumerate(["seen", "seen", "unseen", "unseen"])]
    write_jsonl(root / "eval.jsonl", prompts)
    write_jsonl(root / "general.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 3},
                                         {"text": "Return the line number in the current file."}])
    (root / "labeler.py").write_text(LABELER)
    return root


def _recipe(run_dir: Path, tiny_model_dir: Path, **eval_section):
    return recipe_from_dict(recipe_dict(tiny_model_dir, run_dir / "run", "none", cpu=True, lora=None,
                                        data={"eval": {"path": str(run_dir / "eval.jsonl")}},
                                        eval={"max_new_tokens": 8, "num_samples": 2, "batch_size": 4, **eval_section}))


def test_paired_difference_interval_covers_the_mean_and_excludes_zero_only_for_a_clear_gain():
    clear = paired_difference([1.0] * 30 + [0.0] * 2, [0.0] * 32, "ppo", "sft")
    # mean of 30 ones and 2 zeros = 0.9375; every bootstrap mean of these differences is far above 0
    assert clear["mean"] == pytest.approx(0.9375) and 0 < clear["low"] <= clear["mean"] <= clear["high"] <= 1
    noise = paired_difference([1.0, 0.0] * 16, [0.0, 1.0] * 16)  # as many wins as losses: 0 inside the interval
    assert noise["mean"] == 0 and noise["low"] < 0 < noise["high"]
    assert paired_difference([0.5, 0.2], [0.1, 0.1], seed=3) == paired_difference([0.5, 0.2], [0.1, 0.1], seed=3)


def test_a_policys_results_summarise_what_was_measured_and_are_compared_by_each_judge():
    """The phases after sampling work on PolicyResult alone: no model needed."""
    sft = PolicyResult("sft", Path("run/sft"), ["a", "bb"], [1, 2], [0.0, 0.0], task_scores=[0.0, 1.0])
    ppo = PolicyResult("ppo", None, ["c", "dd"], [3, 5], [1.0, 2.0], task_scores=[1.0, 1.0], perplexity=9.0)
    assert sft.summary() == {"adapter": "run/sft", "length": 1.5, "kl": 0.0, "task_score": 0.5}
    assert ppo.summary() == {"adapter": None, "length": 4.0, "kl": 1.5, "perplexity": 9.0, "task_score": 1.0}
    assert ppo.row(1) == {"response": "dd", "kl": 2.0, "task_score": 1.0}  # no reward model: no rm_score
    wins, paired = compare_policies([sft, ppo], seed=0)
    assert [(w.policy, w.baseline, w.judge, w.wins, w.ties) for w in wins] == [("ppo", "sft", "labeler", 1, 1)]
    assert paired[0]["mean"] == 0.5 and paired[0]["n"] == 2


def test_discovers_base_sft_and_every_stage_policy(run_dir, tiny_model_dir):
    policies = discover_policies(_recipe(run_dir, tiny_model_dir))
    assert [p.name for p in policies] == ["base", "sft", "ppo", "ppo-ptx"]
    assert policies[2].metrics == run_dir / "run" / "ppo" / "metrics.jsonl"


def test_the_dpo_policy_joins_the_table_with_paired_differences_against_sft_and_ppo(run_dir, tiny_model_dir,
                                                                                    tmp_path):
    shutil.copytree(run_dir, tmp_path / "copy")
    shared = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"),
                             for_training=False)
    _save_adapter(shared, "dpo", tmp_path / "copy" / "run" / "dpo", "dpo", seed=5)
    recipe = _recipe(tmp_path / "copy", tiny_model_dir, labeler=f"{tmp_path / 'copy' / 'labeler.py'}:judge")
    policies = discover_policies(recipe)
    assert [p.name for p in policies] == ["base", "sft", "ppo", "ppo-ptx", "dpo"]
    assert policies[-1].adapter == tmp_path / "copy" / "run" / "dpo"
    result, out = run_eval(recipe, policies=[p for p in policies if p.name in ("sft", "ppo", "dpo")])
    assert list(result.policies) == ["sft", "ppo", "dpo"] and result.policies["dpo"]["kl"] != 0.0  # KL to SFT
    paired = {(d["policy"], d["baseline"], d["judge"]): d for d in result.paired}
    for baseline in ("sft", "ppo"):
        d = paired[("dpo", baseline, "labeler")]
        assert d["n"] == 4 and d["low"] <= d["mean"] <= d["high"]
    report = (out / "report.md").read_text()
    assert "| dpo |" in report.split("## Policies")[1].split("## Paired differences")[0]
    assert "- **dpo**:" in report  # the summary line against SFT


def test_kl_of_a_policy_against_itself_is_zero_and_against_another_is_not(run_dir, tiny_model_dir):
    shared = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"),
                             for_training=False)
    # The same weights under two names: the computed log-ratio must vanish exactly, token by token.
    shared.load_adapter("a", run_dir / "run" / "ppo" / "policy")
    shared.load_adapter("b", run_dir / "run" / "ppo" / "policy")
    shared.load_adapter("sft", run_dir / "run" / "sft")
    prompts, responses = ["Say hello.", "Count to three."], ["Hello there, friend.", "One two three"]
    queries = [prompt_ids(shared.tokenizer, p) for p in prompts]
    seqs = [q + response_ids(shared.tokenizer, r) for q, r in zip(queries, responses, strict=True)]
    starts = [len(q) for q in queries]
    assert kl_to_reference(shared, "a", "b", seqs, starts, 0.7, 2) == [0.0, 0.0]
    other = kl_to_reference(shared, "a", "sft", seqs, starts, 0.7, 2)
    assert all(abs(v) > 1e-3 for v in other)
    # Padding in a batch must not change a row's log-probs (batch of 2 vs one at a time).
    single = [kl_to_reference(shared, "a", "sft", [s], [st], 0.7, 1)[0] for s, st in zip(seqs, starts, strict=True)]
    assert single == pytest.approx(other, abs=1e-4)


def test_sequence_logprobs_match_the_full_logits_of_the_model(tiny_model_dir):
    # The LM head runs per sequence on the scored positions only; the result must be what the model's own
    # [B, T, V] logits give, for an adapter role and the bare base, with padding and a temperature.
    shared = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"),
                             for_training=False)
    torch.manual_seed(0)
    shared.add_adapter("a", LoraSettings(r=4, alpha=8, dropout=0.0), trainable=False)
    with torch.no_grad():  # PEFT starts B at zero: give the adapter an effect
        for name, p in shared.model.named_parameters():
            if "lora_B.a" in name:
                p.normal_(0, 0.5)
    seqs = [[5, 9, 13, 2, 7, 11], [3, 4], [8, 1, 6, 12, 30]]
    starts = [3, 1, 2]
    for role in ("a", None):
        got = sequence_logprobs(shared, role, seqs, starts, temperature=0.7, batch_size=2)
        with shared.use(role) as model, torch.no_grad():
            for seq, start, row in zip(seqs, starts, got, strict=True):
                ids = torch.tensor([seq])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float() / 0.7, -1)
                want = logp.gather(-1, ids[0, 1:, None])[:, 0][start - 1:]
                assert row.shape == want.shape
                torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], sequence_logprobs(shared, "a", seqs, starts, 0.7, 2)[0])  # the adapter counts


def test_perplexity_matches_the_models_own_loss(tiny_model_dir):
    shared = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"),
                             for_training=False)
    text = "The quick brown fox jumps over the lazy dog."
    ids = shared.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = shared.model(input_ids=ids, labels=ids).loss
    assert perplexity(shared, None, [text]) == pytest.approx(math.exp(float(loss)), rel=1e-4)
    with torch.no_grad():  # eval.general_max_tokens cuts each text
        cut = shared.model(input_ids=ids[:, :5], labels=ids[:, :5]).loss
    assert perplexity(shared, None, [text], max_tokens=5) == pytest.approx(math.exp(float(cut)), rel=1e-4)


def test_eval_preflight_is_sized_by_the_longest_prompt(run_dir, tiny_model_dir, monkeypatch):
    from lora_rlhf.core.loading import load_tokenizer
    from lora_rlhf.stages.eval import evaluate as eval_stage

    seen = {}

    def planned(recipe, stage, sequence_length=None, prompt_length=None):
        seen.update(stage=stage, prompt_length=prompt_length)
        raise Stop

    monkeypatch.setattr(eval_stage, "check_memory", planned)
    recipe = _recipe(run_dir, tiny_model_dir)
    with pytest.raises(Stop):
        run_eval(recipe, out_dir=run_dir / "never")
    tokenizer = load_tokenizer(recipe.model)
    prompts = [json.loads(line)["prompt"] for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert seen == {"stage": "eval", "prompt_length": max(len(prompt_ids(tokenizer, p)) for p in prompts)}


def test_eval_writes_a_report_holding_every_policy(run_dir, tiny_model_dir):
    recipe = _recipe(run_dir, tiny_model_dir, labeler=f"{run_dir / 'labeler.py'}:judge",
                     general_text=str(run_dir / "general.jsonl"))
    result, out = run_eval(recipe)
    names = ["base", "sft", "ppo", "ppo-ptx"]
    data = json.loads((out / "results.json").read_text())
    assert list(data["policies"]) == names
    for name in names:
        p = data["policies"][name]
        assert set(p) >= {"task_score", "rm_score", "kl", "length", "perplexity", "task_score_by_split"}
        assert set(p["task_score_by_split"]) == {"seen", "unseen"}
    # The reference is OUT/sft: SFT's KL to it is 0, the others' is not.
    assert data["policies"]["sft"]["kl"] == 0.0
    assert data["policies"]["ppo"]["kl"] != 0.0
    assert data["settings"]["reference"].endswith("sft")
    # 4 policies -> 6 pairs, judged by the labeler and by the reward model.
    assert len(data["win_rates"]) == 12
    assert {(w["policy"], w["baseline"]) for w in data["win_rates"]} >= {("ppo", "sft"), ("ppo", "base")}
    # Win rates agree with the per-prompt labeler scores in responses.jsonl.
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    ppo_vs_sft = next(w for w in data["win_rates"] if (w["policy"], w["baseline"], w["judge"]) == ("ppo", "sft", "labeler"))
    expected = win_rate([r["ppo"]["task_score"] for r in rows], [r["sft"]["task_score"] for r in rows])
    assert ppo_vs_sft["win_rate"] == expected.rate
    # RM scores have the reward adapter's offset taken off.
    assert all(isinstance(r["base"]["rm_score"], float) for r in rows)
    report = (out / "report.md").read_text()
    table = report.split("## Policies")[1].split("## Win rates")[0]
    for name in names:
        assert f"| {name} |" in table
    assert "task score (unseen)" in table
    assert "## Summary" in report and "preferred to sft" in report
    for png in ("scores.png", "win_rates.png", "ppo_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in report


def test_bad_input_fails_before_anything_is_written(run_dir, tiny_model_dir, tmp_path):
    recipe = _recipe(run_dir, tiny_model_dir)
    recipe.data.eval = None
    with pytest.raises(DataError, match="no data.eval section"):
        run_eval(recipe, out_dir=tmp_path / "a")
    recipe = _recipe(run_dir, tiny_model_dir, general_text=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        run_eval(recipe, out_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_report_from_plain_results_summarises_what_each_trained_policy_changed(tmp_path):
    results = {
        "settings": {"eval_prompts": 4, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 8, "seed": 0,
                     "reference": "run/sft", "reward_adapter": None, "labeler": "x:y", "general_text": "g.jsonl",
                     "general_texts": 2, "seconds_total": 1.0},
        "policies": {"base": {"task_score": 0.25, "kl": 9.0, "length": 30.0, "perplexity": 20.0},
                     "sft": {"task_score": 0.5, "kl": 0.0, "length": 20.0, "perplexity": 22.0},
                     "ppo": {"task_score": 0.75, "kl": 2.5, "length": 25.0, "perplexity": 25.0}},
        "win_rates": [win_rate([1, 1, 0.5, 0], [0, 0.5, 0.5, 0], "ppo", "sft").as_dict()],
        "curves": {},
    }
    rows = [{"prompt": "Describe snow. Avoid commas entirely.", "base": {"response": "a"}, "sft": {"response": "b"},
             "ppo": {"response": "c"}}]
    report = write_report(tmp_path, results, rows, num_samples=1).read_text()
    # ppo: 2 wins + 2 ties of 4 -> 75 %; stderr sqrt(.75 * .25 / 4) = 22 %; ppl 25 vs 20 -> +25 %.
    assert ("- **ppo**: task score 0.750 (sft 0.500, base 0.250); preferred to sft 75 ± 22 % of the time "
            "(labeler); general-text perplexity 25.00 vs base 20.00 (+25 %).") in report
    assert "| ppo | 0.750 | 2.50 | 25.0 | 25.00 |" in report
    assert "RM score" not in report.split("## Win rates")[0]  # not measured, not shown
    assert "held-out pairs" not in report  # no reward model, no accuracy line
    results["settings"] |= {"reward_adapter": "run/reward", "reward_model_accuracy": {
        "accuracy": 0.625, "accuracy_low": 0.5, "accuracy_high": 0.75, "pairs": 40, "prompts": 4}}
    report = write_report(tmp_path, results, rows, num_samples=1).read_text()
    assert ("Reward model: `run/reward` (orders 62.5 % of 40 held-out pairs from 4 prompts correctly, 95 % "
            "interval [50.0, 75.0] %)") in report
    # ... and right above the policies' table, with a verdict: this interval does not exclude chance
    table = report.split("## Policies")[1].split("| policy |")[0]
    assert "orders 62.5 % of 40 held-out pairs from 4 prompts correctly" in table and "NOT distinguishable" in table
    assert json.loads((tmp_path / "results.json").read_text())["policies"]["ppo"]["kl"] == 2.5


def test_a_rewrite_cut_short_leaves_no_earlier_results_beside_the_new_files(tmp_path, monkeypatch):
    """results.json marks a finished evaluation: a new report that fails half-way must not leave the old marker
    next to its own responses.jsonl, or the pipeline would skip the stage; and the earlier evaluation is not lost
    (it was deleted before): it is whole in previous-1."""
    from lora_rlhf.stages.eval import report

    (tmp_path / "results.json").write_text('{"policies": {}}')
    (tmp_path / "report.md").write_text("# the earlier report")
    (tmp_path / "responses.jsonl").write_text('{"prompt": "earlier"}\n')

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_scores", disk_full)  # the first write after responses.jsonl
    results = {"settings": {}, "policies": {}, "win_rates": [], "curves": {}}
    with pytest.raises(OSError):
        write_report(tmp_path, results, [{"prompt": "p"}], num_samples=0)
    assert (tmp_path / "responses.jsonl").is_file() and not (tmp_path / "results.json").exists()
    kept = tmp_path / "previous-1"
    assert (kept / "results.json").read_text() == '{"policies": {}}'
    assert (kept / "report.md").read_text() == "# the earlier report"
    assert "earlier" in (kept / "responses.jsonl").read_text()
    monkeypatch.undo()
    results["settings"] = {"eval_prompts": 1, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 8, "seed": 0,
                           "reference": "base", "reward_adapter": None, "labeler": None, "seconds_total": 1.0}
    write_report(tmp_path, results, [{"prompt": "p"}], num_samples=0)  # the rerun: nothing finished to keep
    assert (tmp_path / "results.json").is_file() and not (tmp_path / "previous-2").exists()
    write_report(tmp_path, results, [{"prompt": "q"}], num_samples=0)  # over a finished one: kept as previous-2
    assert json.loads((tmp_path / "previous-2" / "responses.jsonl").read_text())["prompt"] == "p"
    assert (kept / "results.json").read_text() == '{"policies": {}}'


def test_the_report_shows_the_rm_against_the_gold_score_during_ppo(tmp_path):
    """With ppo.gold_fn logged, the report compares the first and last quarter of PPO's steps for the RM score, the
    gold score, the KL and the length (a proxy that rises while the gold score falls is over-optimisation), and the
    curves plot gains the RM-vs-gold panel (a wider figure)."""
    from lora_rlhf.stages.eval.report import during_ppo

    rows = [{"step": i + 1, "objective/scores": 0.1 * i, "objective/gold": 0.5 - 0.05 * i, "objective/kl": 0.2 * i,
             "val/response_length": 20 + 2 * i} for i in range(8)]
    metrics = write_jsonl(tmp_path / "m.jsonl", rows)
    lines = during_ppo({"ppo": str(metrics)})
    # quarters of 8 steps: steps 1-2 and 7-8
    assert ("- **ppo**: RM score 0.050 -> 0.650; gold score 0.475 -> 0.175; KL 0.10 -> 1.30; length (tokens) "
            "21.0 -> 33.0.") in lines
    assert plot_training_curves({"ppo": str(metrics)}, tmp_path / "gold.png")
    import matplotlib.image

    plain = write_jsonl(tmp_path / "p.jsonl", [{k: v for k, v in r.items() if k != "objective/gold"} for r in rows])
    assert plot_training_curves({"ppo": str(plain)}, tmp_path / "plain.png")
    assert matplotlib.image.imread(tmp_path / "gold.png").shape[1] > matplotlib.image.imread(
        tmp_path / "plain.png").shape[1]
    assert "gold score" not in " ".join(during_ppo({"ppo": str(plain)}))
    assert during_ppo({}) == []


def test_training_curve_and_win_rate_plots_are_pngs(tmp_path):
    metrics = write_jsonl(tmp_path / "m.jsonl", [{"step": 1, "objective/scores": 0.1, "objective/kl": 0.0},
                                                 {"step": 2, "objective/scores": 0.4, "objective/kl": 1.5}])
    assert plot_training_curves({"ppo": str(metrics)}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    # Nothing to plot -> no file rather than an empty figure.
    empty = write_jsonl(tmp_path / "e.jsonl", [{"step": 1, "loss": 1.0}])
    assert not plot_training_curves({"ppo": str(empty)}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    w = win_rate([1, 0, 1], [0, 0, 0], "ppo", "sft").as_dict()
    assert plot_win_rates([w], tmp_path / "w.png")
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "w.png").shape[2] in (3, 4)


def test_cli_prints_the_table_and_reports_errors(run_dir, tiny_model_dir, tmp_path):
    from lora_rlhf_cli.main import app

    recipe_path = tmp_path / "recipe.yaml"
    import yaml

    recipe_path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, run_dir / "run", "none", cpu=True, lora=None,
                                                      data={"eval": {"path": str(run_dir / "eval.jsonl")}},
                                                      eval={"max_new_tokens": 6, "batch_size": 4})))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(recipe_path), "--policy", "base=base", "--policy",
                              f"sft={run_dir / 'run' / 'sft'}", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "| sft |" in res.stdout and "| base |" in res.stdout
    # The given policies replace discovery; with no labeler the reward model alone judges, and without
    # eval.general_text there is no perplexity.
    data = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert list(data["policies"]) == ["base", "sft"]
    assert [w["judge"] for w in data["win_rates"]] == ["reward model"]
    assert "perplexity" not in data["policies"]["base"]
    assert "| sft |" in (tmp_path / "ev" / "report.md").read_text()
    res = runner.invoke(app, ["eval", str(recipe_path), "--policy", "oops"])
    assert res.exit_code == 2
    assert "NAME=ADAPTER" in res.output
    res = runner.invoke(app, ["eval", str(recipe_path), "--policy", f"x={tmp_path / 'nowhere'}"])
    assert res.exit_code == 2
    assert "does not exist" in res.output
