"""Adapters on the Hugging Face Hub: download (safetensors only)."""

from __future__ import annotations

from pathlib import Path

from lora_rlhf.errors import ModelError


def split_revision(repo: str) -> tuple[str, str | None]:
    """'user/name@rev' -> ('user/name', 'rev')."""
    name, _, rev = repo.partition("@")
    return name, rev or None


def download_adapter(repo: str) -> Path:
    """Download an adapter repo's safetensors and JSON files (never pickles) and return the local folder."""
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(repo)
    try:
        folder = snapshot_download(repo_id, revision=revision,
                                   allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.yaml", "*.md", "*.txt"])
    except Exception as e:  # network, auth, missing repo: one message with the cause
        raise ModelError(f"cannot download adapter '{repo}' from the Hub ({type(e).__name__}: {str(e)[:200]})",
                         fix="check the repo id and revision, your network, and `hf auth login` for private repos")
    path = Path(folder)
    if not (path / "adapter_model.safetensors").is_file():
        raise ModelError(f"Hub repo '{repo}' has no adapter_model.safetensors (only safetensors are loaded, "
                         "never pickled .bin files)", fix="re-save the adapter with safe_serialization=True")
    return path
