"""Sharing adapters end to end: `lora-rlhf push` / `pull` and Hub references in `load_adapter`, against a local
stand-in for the Hub (tests/fake_hub.py: stdlib http.server on 127.0.0.1 answering the endpoints
huggingface_hub 2.4 calls). No test here reaches the network."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from fake_hub import FakeHubServer, make_run_folder
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_rlhf.core.base import SharedBase
from lora_rlhf.errors import ModelError
from lora_rlhf.hub import client as hub
from lora_rlhf.hub.card import read_front_matter
from lora_rlhf.recipe.config import ModelConfig, QuantizationConfig
from lora_rlhf_cli.main import app

TOKEN = "hf_" + "FakeToken42" * 3
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("hub-e2e") / "run", tiny_model_dir, quantization="none")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running fake Hub; huggingface_hub pointed at it (online, empty cache, HF_TOKEN = TOKEN)."""
    import huggingface_hub.constants as constants

    with FakeHubServer(TOKEN) as fh:
        # huggingface_hub reads these once at import: patch the module, and set the env for our own code.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            constants.HUGGINGFACE_CO_URL_TEMPLATE.replace(constants.ENDPOINT, fh.url))
        monkeypatch.setattr(constants, "ENDPOINT", fh.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        monkeypatch.setenv("HF_ENDPOINT", fh.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield fh


def load_base(model_dir) -> SharedBase:
    return SharedBase.load(ModelConfig(name=str(model_dir), device="cpu"), QuantizationConfig(mode="none"),
                           for_training=False)


def test_push_all_then_pull_round_trips(run_dir, fake_hub, tmp_path):
    result = runner.invoke(app, ["push", str(run_dir), "alice/rlhf-demo", "--what", "all", "--private"])
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    repo = fake_hub.repos["alice/rlhf-demo"]
    assert repo.private
    files = fake_hub.files("alice/rlhf-demo")
    plan = hub.plan_push(run_dir, "alice/rlhf-demo", what="all")
    assert set(files) == set(plan.files) | {".gitattributes"}  # one commit with exactly the plan
    assert files["reward/head.safetensors"] == (run_dir / "reward" / "head.safetensors").read_bytes()
    assert files["adapter_model.safetensors"] == (run_dir / "ppo" / "policy" / "adapter_model.safetensors").read_bytes()
    assert read_front_matter(files["README.md"].decode())["library_name"] == "peft"
    assert repo.messages[repo.branches["main"]] == plan.commit_message
    calls = [(m, p) for m, p, _ in fake_hub.requests if p.startswith("/api/") and "agent-harnesses" not in p]
    assert calls == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                     ("POST", "/api/models/alice/rlhf-demo/preupload/main"),
                     ("POST", "/api/models/alice/rlhf-demo/commit/main")]
    assert all(authorized for _, p, authorized in fake_hub.requests if p.startswith("/api/models"))

    dest = tmp_path / "pulled"
    result = runner.invoke(app, ["pull", "alice/rlhf-demo", str(dest)])
    assert result.exit_code == 0, result.output
    for name in ("adapter_model.safetensors", "lora_rlhf.json", "README.md", "reward/head.safetensors",
                 "value/adapter_model.safetensors", "sft/adapter_config.json"):
        assert (dest / name).read_bytes() == files[name], name
    assert not (dest / ".gitattributes").exists() and not (dest / ".cache").exists()
    assert f"{dest / 'reward'}" in result.output

    result = runner.invoke(app, ["pull", "alice/rlhf-demo", str(dest)])
    assert result.exit_code == 2 and "already exists and is not empty" in result.output


def test_hub_reference_with_revision_and_subfolder_loads_adapter_and_head(run_dir, fake_hub, tiny_model_dir,
                                                                           monkeypatch):
    result = runner.invoke(app, ["push", str(run_dir), "alice/rm", "--what", "all", "--revision", "exp"])
    assert result.exit_code == 0, result.output
    assert "reward/head.safetensors" in fake_hub.files("alice/rm", "exp")
    assert "reward/head.safetensors" not in fake_hub.files("alice/rm", "main")  # the branch only

    sb = load_base(tiny_model_dir)
    meta = sb.load_adapter("reward", hub.local_adapter("alice/rm@exp:reward"))
    assert meta["role"] == "reward" and meta["reward_offset"] == 0.25
    local = load_file(str(run_dir / "reward" / "head.safetensors"))
    assert torch.equal(sb.heads["reward"].linear.weight.detach(), local["weight"])
    assert not any(p.endswith((".bin", ".pt", ".log")) for _, p, _ in fake_hub.requests)
    online = hub.download_adapter("alice/rm@exp:reward")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # later runs without network use the cached copy
    assert hub.download_adapter("alice/rm@exp:reward") == online
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError, match="revision does not exist"):
        hub.download_adapter("alice/rm@nope:reward")
    with pytest.raises(ModelError, match=r"keeps its adapters in subfolders \(reward\)\n.*alice/rm-only-subfolders@main:reward"):
        fake_hub.add_repo("alice/rm-only-subfolders", {"reward/adapter_model.safetensors": b"x"})
        hub.download_adapter("alice/rm-only-subfolders@main")


def test_hub_adapter_on_another_base_is_refused_naming_both(run_dir, fake_hub, other_tiny_model_dir, tiny_model_dir):
    assert runner.invoke(app, ["push", str(run_dir / "sft"), "alice/sft"]).exit_code == 0
    sb = load_base(other_tiny_model_dir)
    with pytest.raises(ModelError) as err:
        sb.load_adapter("policy", hub.local_adapter("alice/sft"))
    message = str(err.value)
    recorded = json.loads((run_dir / "sft" / "lora_rlhf.json").read_text())["base"]
    assert f"trained on base '{tiny_model_dir}'" in message and recorded["fingerprint"] in message
    assert f"loaded base is '{other_tiny_model_dir}'" in message and sb.info["fingerprint"] in message


def test_repo_with_only_a_pickled_adapter_is_refused(fake_hub, tmp_path):
    fake_hub.add_repo("bob/pickled", {"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04evil"})
    with pytest.raises(ModelError, match=r"only as pickled adapter_model\.bin.*safetensors only"):
        hub.download_adapter("bob/pickled")
    result = runner.invoke(app, ["pull", "bob/pickled", str(tmp_path / "p")])
    assert result.exit_code == 2 and "pickled adapter_model.bin" in result.output
    assert not (tmp_path / "p").exists()
    assert not any(p.endswith(".bin") for _, p, _ in fake_hub.requests)  # never even downloaded


def test_private_repo_without_token_is_a_clear_error(run_dir, fake_hub, tmp_path, monkeypatch):
    assert runner.invoke(app, ["push", str(run_dir / "sft"), "alice/secret", "--private"]).exit_code == 0
    monkeypatch.delenv("HF_TOKEN")
    result = runner.invoke(app, ["pull", "alice/secret", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "private/gated" in result.output and "hf auth login" in result.output


def test_token_is_never_printed_or_logged(run_dir, fake_hub, caplog):
    fake_hub.echo_auth_on_commit = True  # the server's error message quotes our Authorization header
    caplog.set_level(logging.DEBUG)
    result = runner.invoke(app, ["push", str(run_dir / "sft"), "alice/leaky"])
    assert result.exit_code == 2
    assert "commit rejected for Bearer ***" in result.output  # the server's message, redacted
    assert TOKEN not in result.output and TOKEN not in caplog.text
    fake_hub.echo_auth_on_commit = False
    result = runner.invoke(app, ["push", str(run_dir / "sft"), "alice/leaky", "--dry-run"])
    assert result.exit_code == 0 and "Would upload" in result.output and TOKEN not in result.output
    assert "alice/leaky" in fake_hub.repos and "adapter_model.safetensors" not in fake_hub.files("alice/leaky")


def test_card_takes_license_and_base_model_of_a_hub_base(run_dir, fake_hub, tmp_path):
    # An adapter recorded as trained on a Hub base (the tiny test bases are local folders, so edit the record).
    folder = tmp_path / "sft"
    shutil.copytree(run_dir / "sft", folder)
    meta = json.loads((folder / "lora_rlhf.json").read_text())
    meta["base"].update(name_or_path="acme/base-7b", revision="v1.0")
    (folder / "lora_rlhf.json").write_text(json.dumps(meta))
    fake_hub.add_repo("acme/base-7b", {"README.md": b"---\nlicense: llama3.2\n---\n# base\n"})
    fake_hub.repos["acme/base-7b"].branches["v1.0"] = fake_hub.repos["acme/base-7b"].branches["main"]
    result = runner.invoke(app, ["push", str(folder), "alice/from-hub-base"])
    assert result.exit_code == 0, result.output
    card = fake_hub.files("alice/from-hub-base")["README.md"].decode()
    front = read_front_matter(card)
    assert front["license"] == "llama3.2" and front["base_model"] == "acme/base-7b"
    assert "| base revision | `v1.0` |" in card and "license could not be determined" not in card
