"""Sharing adapters, offline part: what `push` would upload (files, layout, cards, commit) and the errors that
must come before any network call. The end-to-end push/pull against a local fake Hub is in test_hub_server.py."""

from __future__ import annotations

import json
import shutil

import pytest
from fake_hub import make_run_folder

from lora_rlhf.errors import ModelError
from lora_rlhf.hub import client as hub
from lora_rlhf.hub.card import base_model_id, read_front_matter

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "lora_rlhf.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "recipe.yaml", "metrics.json", "README.md"}


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("hub") / "run", tiny_model_dir, quantization="4bit")


def test_parse_ref_accepts_revision_and_subfolder():
    assert hub.parse_ref("alice/rlhf") == hub.HubRef("alice/rlhf")
    assert hub.parse_ref("alice/rlhf@v2") == hub.HubRef("alice/rlhf", "v2")
    assert hub.parse_ref("alice/rlhf@v2:reward") == hub.HubRef("alice/rlhf", "v2", "reward")
    assert hub.parse_ref("alice/rlhf:reward") == hub.HubRef("alice/rlhf", None, "reward")
    assert str(hub.parse_ref("alice/rlhf@v2:reward")) == "alice/rlhf@v2:reward"
    with pytest.raises(ModelError, match="not a Hub reference"):
        hub.parse_ref("no-namespace@main")


def test_stage_folder_uploads_safe_files_with_our_card(run_dir):
    plan = hub.plan_push(run_dir / "sft", "alice/sft-demo")
    # train.log, the pickled training_args.bin, checkpoint-1/optimizer.pt and PEFT's template README stay home.
    assert set(plan.files) == ADAPTER_FILES
    assert plan.files["adapter_model.safetensors"] == run_dir / "sft" / "adapter_model.safetensors"
    card = plan.text("README.md")
    front = read_front_matter(card)
    assert front["library_name"] == "peft"
    assert {"lora-rlhf", "rlhf", "peft", "sft", "qlora"} <= set(front["tags"])
    assert front["pipeline_tag"] == "text-generation"
    # The tiny base is a local folder without a README: no base_model id, license "other" with a note.
    assert "base_model" not in front and front["license"] == "other"
    assert "license could not be determined" in card
    meta = json.loads((run_dir / "sft" / "lora_rlhf.json").read_text())
    assert f"| base config fingerprint | `{meta['base']['fingerprint']}` |" in card
    assert "| quantization in training | `4bit` |" in card
    assert "| train_loss | 1.235 |" in card and "| eval.accuracy | 0.75 |" in card
    assert "```yaml\nmodel:\n  name:" in card  # the resolved recipe
    assert "## Evaluation" in card and "| ppo | 0.41 | 2.3 |" in card  # the run's OUT/eval/report.md
    assert "#### Policies" in card and "scores.png" not in card  # nested headings; plots are not in the repo
    assert plan.commit_message.startswith("Upload policy adapter")
    assert meta["base"]["fingerprint"] in plan.commit_description


def test_base_model_and_license_when_known(run_dir, tmp_path):
    plan = hub.plan_push(run_dir / "sft", "alice/sft-demo", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                         license="apache-2.0")
    front = read_front_matter(plan.text("README.md"))
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    # Without overrides: the embedded base maps to its original Hub model; a local base's README gives its license.
    assert base_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub.base_license("smollm2-135m-instruct") == "apache-2.0"
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# a base\n")
    assert hub.base_license(str(tmp_path)) == "mit"
    assert base_model_id(str(tmp_path)) is None and base_model_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


def test_run_folder_all_puts_policy_at_root_and_others_in_subfolders(run_dir):
    plan = hub.plan_push(run_dir, "alice/rlhf", what="all")
    layout = {p.split("/")[0] if "/" in p else "." for p in plan.files}
    assert layout == {".", "sft", "reward", "value"}
    root_meta = json.loads(plan.text("lora_rlhf.json"))
    assert root_meta["stage"] == "ppo" and root_meta["role"] == "policy"  # PPO's policy, not SFT's
    assert {"reward/head.safetensors", "value/head.safetensors"} <= set(plan.files)
    assert "head.safetensors" not in plan.files and "sft/head.safetensors" not in plan.files
    # PPO writes recipe/metrics once in OUT/ppo: both PPO adapters carry them.
    assert plan.files["recipe.yaml"] == run_dir / "ppo" / "recipe.yaml"
    assert plan.files["value/metrics.json"] == run_dir / "ppo" / "metrics.json"
    assert not any(p.endswith((".bin", ".pt", ".log")) or "checkpoint" in p for p in plan.files)
    root = plan.text("README.md")
    assert "`alice/rlhf:reward`" in root and "`alice/rlhf:value`" in root and "`alice/rlhf:sft`" in root
    assert "## Evaluation" in root and "| ppo | 0.41 | 2.3 |" in root
    assert "kl_coef: 0.05" in root and "| mean_reward | 0.41 |" in root
    reward = plan.text("reward/README.md")
    assert "head.safetensors" in reward and "reward offset" in reward and "ppo.reward_adapter: alice/rlhf:reward" in reward
    assert {"reward"} <= set(read_front_matter(reward)["tags"])
    assert "## Evaluation" not in reward  # the eval report is about policies
    assert plan.commit_message == "Upload policy, sft, reward, value adapters (lora-rlhf 0.1.0)"


def test_what_picks_one_adapter_of_a_run(run_dir):
    assert json.loads(hub.plan_push(run_dir, "a/b").text("lora_rlhf.json"))["stage"] == "ppo"
    reward = hub.plan_push(run_dir, "a/b", what="reward")
    assert "head.safetensors" in reward.files and json.loads(reward.text("lora_rlhf.json"))["role"] == "reward"
    value = hub.plan_push(run_dir / "ppo", "a/b", what="value")
    assert json.loads(value.text("lora_rlhf.json"))["role"] == "value"
    with pytest.raises(ModelError, match="holds a policy adapter, not a reward adapter"):
        hub.plan_push(run_dir / "sft", "a/b", what="reward")
    with pytest.raises(ModelError, match="plain repo id"):
        hub.plan_push(run_dir / "sft", "a/b@dev")


def test_unfinished_or_foreign_folders_are_refused(run_dir, tmp_path):
    unfinished = tmp_path / "sft"
    shutil.copytree(run_dir / "sft", unfinished)
    (unfinished / "lora_rlhf.json").unlink()
    with pytest.raises(ModelError, match="did not finish"):
        hub.plan_push(unfinished, "a/b")
    with pytest.raises(ModelError, match="did not finish"):
        hub.plan_push(tmp_path, "a/b")  # a run folder whose only stage is unfinished
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither an adapter folder"):
        hub.plan_push(tmp_path / "empty", "a/b")


def test_files_holding_the_token_are_never_uploaded(run_dir, tmp_path, monkeypatch):
    token = "hf_" + "S3cret" * 6
    folder = tmp_path / "sft"
    shutil.copytree(run_dir / "sft", folder)
    (folder / "recipe.yaml").write_text(f"model:\n  name: x\nsft:\n  hub_token: {token}\n")
    plan = hub.plan_push(folder, "alice/x")

    class NoNetwork:  # the check must happen before any Hub call
        def __getattr__(self, name):
            raise AssertionError(f"Hub called: {name}")

    with pytest.raises(ModelError, match="'recipe.yaml' contains a Hugging Face token") as err:
        hub.push(plan, token=token, api=NoNetwork())
    assert token not in str(err.value)


def test_push_without_a_token_says_how_to_log_in(run_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ModelError, match="no Hugging Face token found.*\n.*hf auth login"):
        hub.push(hub.plan_push(run_dir / "sft", "alice/x"))


def test_hub_reference_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="cannot download adapter 'alice/missing@v1'.*cannot be reached"):
        hub.download_adapter("alice/missing@v1", cache_dir=tmp_path)


def test_redact_hides_known_and_token_shaped_strings():
    token = "hf_" + "a1B2" * 8
    text = f"Authorization: Bearer {token} and another hf_{'Z' * 34}"
    clean = hub.redact(text, token)
    assert token not in clean and "hf_ZZZZ" not in clean and "Bearer ***" in clean


def test_mistyped_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    from lora_rlhf.hub.client import local_adapter as resolve_adapter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelError, match="adapter folder 'runs/sfft' does not exist"):
        resolve_adapter("runs/sfft")


def test_revision_with_a_slash_is_a_hub_reference(tmp_path, monkeypatch):
    """Branches like 'feature/x' are common; the one-slash check must look at the repo id only."""
    import lora_rlhf.hub.client as hub_module
    from lora_rlhf.hub.client import local_adapter as resolve_adapter

    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(hub_module, "download_adapter", lambda ref: asked.append(ref) or tmp_path)
    assert resolve_adapter("alice/rlhf@feature/x:reward") == tmp_path
    assert asked == ["alice/rlhf@feature/x:reward"]
    assert hub.parse_ref("alice/rlhf@feature/x:reward") == hub.HubRef("alice/rlhf", "feature/x", "reward")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_adapter("a/b/c@main")


def test_dry_run_refuses_a_token_like_the_real_push_and_never_prints_it(run_dir, tmp_path):
    from typer.testing import CliRunner

    from lora_rlhf_cli.main import app

    leaky = tmp_path / "sft"
    shutil.copytree(run_dir / "sft", leaky)
    secret = "hf_" + "a1B2" * 8
    (leaky / "metrics.json").write_text(json.dumps({"note": f"token {secret}"}))
    result = CliRunner().invoke(app, ["push", str(leaky), "alice/leaky", "--dry-run"])
    assert result.exit_code == 2 and "contains a Hugging Face token" in result.output
    assert secret not in result.output and "Would upload" not in result.output


@pytest.mark.parametrize("where", ["tokenizer_config.json", "tokenizer.json", "safetensors metadata",
                                   "head.safetensors tensor name"])
def test_the_secret_scan_reads_tokenizer_files_and_safetensors_headers(run_dir, tmp_path, where):
    """push --dry-run listed such files under "Would upload": tokenizer*.json and .safetensors were not scanned."""
    import torch
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from lora_rlhf_cli.main import app

    secret = "hf_" + "Q7xZ" * 8
    leaky = tmp_path / "reward"
    shutil.copytree(run_dir / "reward", leaky)
    if where == "tokenizer_config.json":
        config = json.loads((leaky / where).read_text())
        (leaky / where).write_text(json.dumps({**config, "token": secret}))  # from_pretrained(token=...), saved
    elif where == "tokenizer.json":
        data = json.loads((leaky / where).read_text())
        data["normalizer"] = {"type": "Replace", "pattern": {"String": secret}, "content": ""}
        (leaky / where).write_text(json.dumps(data))
    elif where == "safetensors metadata":
        weights = leaky / "adapter_model.safetensors"
        save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "note": f"pushed with {secret}"})
    else:
        save_file({"weight": torch.zeros(1, 64), secret: torch.zeros(1)}, str(leaky / "head.safetensors"))
    result = CliRunner().invoke(app, ["push", str(leaky), "alice/leaky", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "contains a Hugging Face token" in result.output and "Would upload" not in result.output
    assert secret not in result.output


def test_vocabulary_entries_are_not_mistaken_for_tokens_but_the_token_itself_is_found(run_dir, tmp_path):
    token_like = "hf_" + "Vocab" * 5
    clean = tmp_path / "sft"
    shutil.copytree(run_dir / "sft", clean)
    data = json.loads((clean / "tokenizer.json").read_text())
    data["model"]["vocab"][token_like] = len(data["model"]["vocab"])  # a learned token that looks like one
    (clean / "tokenizer.json").write_text(json.dumps(data))
    plan = hub.plan_push(clean, "alice/x")
    hub.check_no_secrets(plan, token=None)  # no refusal
    with pytest.raises(ModelError, match="'tokenizer.json' contains a Hugging Face token"):
        hub.check_no_secrets(plan, token=token_like)  # the user's own token is refused wherever it is
    (clean / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        hub.check_no_secrets(hub.plan_push(clean, "alice/x"), token=None)


def _with_dpo(run_dir, tmp_path, ppo: bool = True):
    """A copy of the run with OUT/dpo (the SFT folder re-stamped as the dpo stage's), with or without PPO."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.copytree(run / "sft", run / "dpo")
    meta = json.loads((run / "dpo" / "lora_rlhf.json").read_text())
    (run / "dpo" / "lora_rlhf.json").write_text(json.dumps({**meta, "stage": "dpo"}))
    if not ppo:
        shutil.rmtree(run / "ppo")
    return run


def test_dpo_adapter_is_pushed_with_a_dpo_card(run_dir, tmp_path):
    run = _with_dpo(run_dir, tmp_path)
    plan = hub.plan_push(run / "dpo", "alice/dpo", what="dpo")
    card = plan.text("README.md")
    assert "direct preference optimisation" in card and "SFT adapter as the frozen reference" in card
    assert {"dpo", "lora-rlhf"} <= set(read_front_matter(card)["tags"])
    assert "## Evaluation" in card  # the run's eval report, as for any policy
    # beside PPO: `all` keeps it in dpo/, `--what dpo` picks it alone
    everything = hub.plan_push(run, "alice/rlhf", what="all")
    assert {p.split("/")[0] for p in everything.files if "/" in p} == {"dpo", "sft", "reward", "value"}
    assert json.loads(everything.text("lora_rlhf.json"))["stage"] == "ppo"
    assert json.loads(everything.text("dpo/lora_rlhf.json"))["stage"] == "dpo"
    assert "`alice/rlhf:dpo`" in everything.text("README.md")
    assert json.loads(hub.plan_push(run, "a/b", what="dpo").text("lora_rlhf.json"))["stage"] == "dpo"
    # without PPO the run's policy is DPO's, with the SFT reference beside it
    no_ppo = _with_dpo(run_dir, tmp_path / "no-ppo", ppo=False)
    assert json.loads(hub.plan_push(no_ppo, "a/b").text("lora_rlhf.json"))["stage"] == "dpo"
    layout = {p.split("/")[0] if "/" in p else "." for p in hub.plan_push(no_ppo, "a/b", what="all").files}
    assert layout == {".", "sft", "reward"}
