"""Adapters on the Hugging Face Hub: push (with model cards), pull, and download for loading.

A Hub reference is accepted wherever an adapter is (`local_adapter` turns it into a folder in the Hub cache):

    user/name              the adapter at the repo root, default branch
    user/name@rev          a branch, tag or commit
    user/name:sub          the adapter in subfolder `sub` (`push --what all` keeps reward/, value/, sft/ there)
    user/name@rev:sub

`:` can appear neither in repo ids nor in git refs, so the reference is unambiguous.

Only safetensors, JSON, YAML, Markdown, Jinja and text files travel, in both directions: never pickles (`.bin`
weights run code when loaded), trainer checkpoints or optimizer state. The token comes from HF_TOKEN or
`hf auth login` and is redacted from every message we print; a file about to be uploaded that contains it is
refused. `push` creates the repo (and branch) when missing, then makes ONE commit with every file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_rlhf import __version__
from lora_rlhf.core.adapters import ADAPTER_WEIGHTS, META_FILE, local_adapter_folder, read_adapter_meta
from lora_rlhf.core.heads import HEAD_FILE
from lora_rlhf.core.io import atomic_folder
from lora_rlhf.errors import LoraRlhfError, ModelError
from lora_rlhf.hub import WHAT_CHOICES
from lora_rlhf.hub.card import (
    KNOWN_BASES,
    adapter_card,
    base_model_id,
    gather,
    index_card,
    license_from_readme,
)

SAFE_SUFFIXES = (".safetensors", ".json", ".yaml", ".yml", ".md", ".jinja", ".txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Trainer state that may sit next to an adapter: it is large, resumable-only and may hold pickles.
_TRAINER_STATE = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args")
_SIDECARS = ("recipe.yaml", "metrics.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
SAFETENSORS_MAX_HEADER = 100 * 2**20  # bytes: safetensors' own limit


# ---------------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (
            f":{self.subfolder}" if self.subfolder else "")


def split_ref(ref: str) -> tuple[str, str, str]:
    """'user/name@rev:sub' -> ('user/name', 'rev', 'sub'), unchecked ('' for a missing part)."""
    rest, _, sub = ref.partition(":")
    repo_id, _, rev = rest.partition("@")
    return repo_id, rev, sub


def parse_ref(ref: str) -> HubRef:
    """'user/name@rev:sub' -> HubRef('user/name', 'rev', 'sub')."""
    repo_id, rev, sub = split_ref(ref)
    if not _REPO_ID.match(repo_id):
        raise ModelError(f"'{ref}' is not a Hub reference (expected user/name, user/name@revision or "
                         "user/name:subfolder)", fix="check the spelling, or give a local adapter folder")
    return HubRef(repo_id, rev or None, sub.strip("/") or None)


def local_adapter(source: str | Path) -> Path:
    """An adapter folder on disk: a local folder as it is, a Hub reference downloaded (safetensors only) into
    the Hub cache. Every stage resolves adapters through here, so core only ever sees local folders."""
    if Path(source).expanduser().is_dir():
        return local_adapter_folder(source)
    repo_id = split_ref(str(source))[0]  # only the repo id: a revision ("feature/x") may hold slashes
    if str(source).startswith((".", "/", "~")) or repo_id.count("/") != 1:
        return local_adapter_folder(source)  # a path that does not exist: its own clear error
    return download_adapter(str(source))


def hub_token(token: str | None = None) -> str | None:
    """An explicit token, else HF_TOKEN, else the one saved by `hf auth login`."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def redact(text: str, token: str | None) -> str:
    """Remove the token (and anything shaped like a Hub token) from text we are about to print."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _endpoint(endpoint: str | None) -> str | None:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _api(endpoint: str | None, token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(endpoint), token=token, library_name="lora-rlhf", library_version=__version__)


@contextlib.contextmanager
def hub_errors(action: str, token: str | None) -> Iterator[None]:
    """Turn any Hub/network failure into one ModelError with the cause, the fix, and no token in it."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LoraRlhfError:
        raise
    except RevisionNotFoundError as e:
        raise _error(action, "the revision does not exist", e, token, "check the branch, tag or commit") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise _error(action, "the repo does not exist, or is private/gated and your token cannot see it", e,
                     token, "check the repo id; for private repos run `hf auth login` or set HF_TOKEN") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise _error(action, "the Hub cannot be reached (HF_HUB_OFFLINE=1 or no network) and nothing is cached",
                     e, token, "run once with network access (it is then cached), or use a local folder") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            why, fix = "the Hub refused the token", "use a token with write access: `hf auth login` or HF_TOKEN"
        else:
            why, fix = f"the Hub answered HTTP {status}", "check the repo id and try again later"
        raise _error(action, why, e, token, fix) from None
    except httpx2.TransportError as e:
        raise _error(action, "the Hub cannot be reached", e, token, "check your network and HF_ENDPOINT") from None
    except (OSError, ValueError) as e:  # e.g. README metadata the Hub rejects, a full disk
        raise _error(action, "the request failed", e, token, "see the cause above") from None


def _error(action: str, why: str, e: Exception, token: str | None, fix: str) -> ModelError:
    lines = str(e).strip().splitlines()
    detail = lines[0][:300] if lines else ""
    server = getattr(e, "server_message", None)  # what the Hub said: often the actual reason
    if server:
        detail = f"{detail} {server.strip()[:300]}".strip()
    return ModelError(redact(f"cannot {action}: {why} ({type(e).__name__}: {detail})", token), fix=fix)


# ---------------------------------------------------------------------------------------------- push
@dataclass
class AdapterFolder:
    """One complete adapter output folder and the name it gets in a repo with several adapters."""

    label: str
    folder: Path
    meta: dict[str, Any]


@dataclass
class UploadPlan:
    """Everything `push` sends, computed offline: inspect it with --dry-run (and in tests)."""

    repo_id: str
    revision: str | None
    private: bool
    files: dict[str, Path | bytes] = field(default_factory=dict)  # path in repo -> local file or content
    commit_message: str = ""
    commit_description: str = ""

    def text(self, path: str) -> str:
        src = self.files[path]
        return src.decode() if isinstance(src, bytes) else src.read_text()

    def size(self, path: str) -> int:
        src = self.files[path]
        return len(src) if isinstance(src, bytes) else src.stat().st_size


def find_adapters(output_dir: Path, what: str | None = None) -> list[AdapterFolder]:
    """The adapters of a stage folder (OUT/sft) or of a run folder (OUT, or OUT/ppo), chosen by `what`."""
    output_dir = Path(output_dir)
    if what is not None and what not in WHAT_CHOICES:
        raise ModelError(f"--what '{what}' is not one of {', '.join(WHAT_CHOICES)}")
    if (output_dir / META_FILE).is_file():
        meta = read_adapter_meta(output_dir)
        role = meta.get("role", "policy")
        if what not in (None, "all", role) and not (what == "dpo" and meta.get("stage") == "dpo"):
            raise ModelError(f"'{output_dir}' holds a {role} adapter, not a {what} adapter",
                             fix=f"use --what {role} (or all), or point at the run folder that holds all stages")
        return [_checked(AdapterFolder(role, output_dir, meta))]
    if (output_dir / "adapter_config.json").is_file():
        raise _incomplete(output_dir)
    # Run folder layouts: OUT/{sft,reward,dpo,ppo/policy,ppo/value}, or OUT/ppo/{policy,value} itself. The policy
    # is PPO's, else DPO's, else SFT's; a DPO adapter beside a PPO one is its own entry (`--what dpo`, or `all`).
    layout = {"policy": ["ppo/policy", "policy", "dpo", "sft"], "dpo": ["dpo"], "reward": ["reward"],
              "value": ["ppo/value", "value"]}
    found: dict[str, AdapterFolder] = {}
    incomplete: list[Path] = []
    for label, subdirs in layout.items():
        for sub in subdirs:
            folder = output_dir / sub
            if (folder / META_FILE).is_file():
                found.setdefault(label, AdapterFolder(label, folder, read_adapter_meta(folder)))
            elif (folder / "adapter_config.json").is_file():
                incomplete.append(folder)
    policy = found.get("policy")
    if policy is not None and "dpo" in found and found["dpo"].folder == policy.folder and what != "dpo":
        del found["dpo"]  # the run's policy is the DPO adapter itself: one entry
    if policy is not None and policy.folder.name in ("policy", "dpo") and (output_dir / "sft" / META_FILE).is_file():
        # After PPO or DPO the SFT adapter is the reference policy: worth keeping next to the trained one.
        found["sft"] = AdapterFolder("sft", output_dir / "sft", read_adapter_meta(output_dir / "sft"))
    if not found:
        if incomplete:
            raise _incomplete(incomplete[0])
        raise ModelError(f"'{output_dir}' is neither an adapter folder (no {META_FILE}) nor a run folder holding "
                         "sft/, reward/, dpo/ or ppo/",
                         fix="point at OUT/sft, OUT/reward, OUT/dpo, OUT/ppo or the run folder OUT")
    if what == "all":
        chosen = [found[k] for k in ("policy", "dpo", "sft", "reward", "value") if k in found]
    else:
        want = what or "policy"
        if want not in found:
            raise ModelError(f"'{output_dir}' holds no finished {want} adapter (found: {', '.join(found)})",
                             fix=f"use --what {' or '.join(k for k in found if k != 'sft')} or all")
        chosen = [found[want]]
    return [_checked(a) for a in chosen]


def _incomplete(folder: Path) -> ModelError:
    return ModelError(f"'{folder}' has adapter weights but no {META_FILE}: its stage did not finish "
                      f"({META_FILE} is written last)", fix="resume or re-run the stage, then push")


def _checked(adapter: AdapterFolder) -> AdapterFolder:
    folder = adapter.folder
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise ModelError(f"'{folder}' has no {ADAPTER_WEIGHTS}" + (f" (only {', '.join(pickles)})" if pickles else ""),
                         fix="only safetensors are shared; re-save the adapter with safe_serialization=True")
    if adapter.meta.get("head") and not (folder / HEAD_FILE).is_file():
        raise ModelError(f"'{folder}' is a {adapter.meta.get('role')} adapter but lacks {HEAD_FILE}",
                         fix="re-run the stage: the scalar head is part of the adapter")
    return adapter


def shareable_files(folder: Path) -> dict[str, Path]:
    """Files of one adapter folder that are uploaded: safe types only, top level only (checkpoints live in
    subfolders), PEFT's template README replaced by our card; recipe/metrics from the PPO run folder too."""
    files: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if (f.is_file() and f.suffix in SAFE_SUFFIXES and f.name != "README.md"
                and not f.name.startswith(_TRAINER_STATE)):
            files[f.name] = f
    for name in _SIDECARS:
        if name not in files and (folder.parent / name).is_file():
            files[name] = folder.parent / name
    return files


def base_license(name: str, revision: str | None = None, api: Any = None, online: bool = True) -> str | None:
    """The base's license: known embedded bases, a local folder's README, the cached or (`online`) Hub card."""
    if name in KNOWN_BASES:
        return KNOWN_BASES[name][1]
    path = Path(name).expanduser()
    if path.is_dir():
        return license_from_readme(path / "README.md")
    if base_model_id(name) is None:
        return None
    with contextlib.suppress(Exception):  # best effort: an unknown license becomes "other" with a note
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "README.md", revision=revision)
        if isinstance(cached, str):
            return license_from_readme(Path(cached))
    if online:
        with contextlib.suppress(Exception):
            data = (api or _api(None, hub_token())).model_info(name, revision=revision).card_data
            value = getattr(data, "license", None) if data is not None else None
            return str(value) if value else None
    return None


def plan_push(output_dir: str | Path, repo_id: str, *, what: str | None = None, revision: str | None = None,
              private: bool = False, base_model: str | None = None, license: str | None = None,
              api: Any = None) -> UploadPlan:
    """Choose the adapters, their files and cards. One adapter goes to the repo root; several: the policy at
    the root (so `user/name` loads it) and the others in subfolders named by role."""
    ref = parse_ref(repo_id)
    if ref.revision or ref.subfolder:
        raise ModelError(f"push takes a plain repo id, got '{repo_id}'",
                         fix=f"use `push OUT {ref.repo_id} --revision {ref.revision or 'BRANCH'}`")
    adapters = find_adapters(Path(output_dir), what)
    root = adapters[0] if len(adapters) == 1 else next((a for a in adapters if a.label == "policy"), None)
    prefixes = {a.label: "" if a is root else f"{a.label}/" for a in adapters}
    others = [(a.label, a.meta.get("role", a.label)) for a in adapters if a is not root]
    base = adapters[0].meta.get("base", {})
    lic = license or base_license(str(base.get("name_or_path", "")), base.get("revision"), api)

    plan = UploadPlan(ref.repo_id, revision, private)
    for a in adapters:
        prefix = prefixes[a.label]
        for name, src in shareable_files(a.folder).items():
            plan.files[prefix + name] = src
        card = adapter_card(gather(a.folder, a.meta), ref.repo_id, subfolder=prefix.rstrip("/") or None,
                            license=lic, base_model=base_model, others=others if a is root else None)
        plan.files[prefix + "README.md"] = card.encode()
    if root is None:
        plan.files["README.md"] = index_card(ref.repo_id, others, lic,
                                             base_model or base_model_id(str(base.get("name_or_path", "")))).encode()
    labels = ", ".join(a.label for a in adapters)
    plan.commit_message = f"Upload {labels} adapter{'s' if len(adapters) > 1 else ''} (lora-rlhf {__version__})"
    plan.commit_description = "\n".join(
        f"- {prefixes[a.label] or '(root)'}: {a.meta.get('role')} adapter from stage {a.meta.get('stage')}, base "
        f"{a.meta.get('base', {}).get('name_or_path')} (fingerprint {a.meta.get('base', {}).get('fingerprint')}), "
        f"trained with quantization {a.meta.get('quantization')}" for a in adapters)
    return plan


def check_no_secrets(plan: UploadPlan, token: str | None) -> None:
    """Refuse to publish any file of the plan that holds the token, or anything shaped like a Hub token.

    Every file is read: text files whole, .safetensors files by their header (tensor names and the free-form
    `__metadata__`, text anyone can read). Only the entries of a vocabulary (tokenizer.json's model.vocab and
    model.merges, vocab.json, merges.txt) are spared the shape search, where a learned token could look like
    one; the token itself is searched there too. tokenizer_config.json and the rest of tokenizer.json are searched
    in full: a tokenizer saved with `token=` carries it there.
    """
    for path in plan.files:
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".safetensors"):
            text = shaped = _safetensors_header(plan.files[path], path)
        else:
            text = plan.text(path)
            shaped = _without_vocabulary(name, text)
        if (token and token in text) or _TOKEN_LIKE.search(shaped):
            raise ModelError(f"'{path}' contains a Hugging Face token: refusing to upload it",
                             fix="remove the token from that file (pass it through HF_TOKEN or `hf auth login`)")


def _safetensors_header(src: Path | bytes, path: str) -> str:
    """The JSON header of a .safetensors file (an 8-byte little-endian length, then that much JSON), as text."""
    if isinstance(src, Path):
        with src.open("rb") as f:
            data = f.read(8)
            size = int.from_bytes(data, "little")
            data += f.read(size if len(data) == 8 and size <= SAFETENSORS_MAX_HEADER else 0)
    else:
        data = src[:8 + SAFETENSORS_MAX_HEADER]
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 <= size <= min(len(data) - 8, SAFETENSORS_MAX_HEADER):
        raise ModelError(f"'{path}' is not a valid safetensors file (its header length says {size} bytes)",
                         fix="re-save the adapter (its weights file is damaged), then push again")
    return data[8:8 + size].decode("utf-8", errors="replace")


def _without_vocabulary(name: str, text: str) -> str:
    """`text` less the vocabulary entries of a tokenizer file (see check_no_secrets)."""
    if name in ("vocab.json", "merges.txt"):
        return ""
    if name == "tokenizer.json":
        try:
            data = json.loads(text)
        except ValueError:
            return text
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict):
            data["model"] = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
            return json.dumps(data)
    return text


def push(plan: UploadPlan, *, token: str | None = None, endpoint: str | None = None, api: Any = None) -> str:
    """Create the repo (and branch) if needed and upload the plan's files in one commit. Returns its URL."""
    from huggingface_hub import CommitOperationAdd

    token = hub_token(token)
    if not token:
        raise ModelError("no Hugging Face token found: uploading needs one with write access",
                         fix="run `hf auth login`, or set the HF_TOKEN environment variable")
    check_no_secrets(plan, token)
    api = api or _api(endpoint, token)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=src if isinstance(src, bytes) else str(src))
                  for path, src in plan.files.items()]
    with hub_errors(f"push to '{plan.repo_id}'", token):
        # private=None (not False) leaves an organisation's default visibility alone.
        api.create_repo(plan.repo_id, repo_type="model", private=True if plan.private else None, exist_ok=True)
        if plan.revision and plan.revision != "main":
            api.create_branch(plan.repo_id, branch=plan.revision, repo_type="model", exist_ok=True)
        info = api.create_commit(plan.repo_id, operations=operations, commit_message=plan.commit_message,
                                 commit_description=plan.commit_description, revision=plan.revision,
                                 repo_type="model")
    return str(info.commit_url)


# ---------------------------------------------------------------------------------------------- download / pull
def _select(names: list[str], ref: HubRef) -> list[str]:
    """Safe files of the adapter `ref` names (its folder's top level); clear errors when it cannot load."""
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    here = [n[len(prefix):] for n in names if n.startswith(prefix) and "/" not in n[len(prefix):]]
    if ADAPTER_WEIGHTS not in here:
        pickles = [n for n in here if n.endswith(PICKLE_SUFFIXES)]
        subs = sorted({n.split("/")[0] for n in names if n.endswith("/" + ADAPTER_WEIGHTS) and not prefix})
        if pickles:
            raise ModelError(
                f"Hub repo '{ref}' holds its weights only as pickled {', '.join(pickles)}: lora-rlhf loads "
                "safetensors only, because unpickling a file runs whatever code it contains",
                fix="ask the owner to re-save it with safe_serialization=True (PEFT's default), or convert a copy "
                    "you trust with safetensors.torch.save_file")
        if subs:
            raise ModelError(f"Hub repo '{ref}' keeps its adapters in subfolders ({', '.join(subs)})",
                             fix=f"name one: {ref.repo_id}{'@' + ref.revision if ref.revision else ''}:{subs[0]}")
        raise ModelError(f"Hub repo '{ref}' has no {ADAPTER_WEIGHTS}" + (f" in '{ref.subfolder}/'" if prefix else ""),
                         fix="check the repo id, revision and subfolder")
    return [prefix + n for n in here if n.endswith(SAFE_SUFFIXES)]


def _snapshot(ref: HubRef, files: list[str], *, revision: str | None, endpoint: str | None,
              token: str | None, cache_dir: str | Path | None, local_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(ref.repo_id, revision=revision, allow_patterns=files,
                                  endpoint=_endpoint(endpoint), token=token, cache_dir=cache_dir,
                                  local_files_only=local_only))


def download_adapter(repo: str, *, endpoint: str | None = None, token: str | None = None,
                     cache_dir: str | Path | None = None) -> Path:
    """Download one adapter (safetensors and its JSON/text files, never pickles) into the Hub cache and return
    its folder. Offline, a previously downloaded copy is used. The caller checks the base (check_adapter_base)."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    ref = parse_ref(repo)
    token = hub_token(token)
    if Path(ref.repo_id.split("/")[0]).is_dir():
        # 'runs/sft' with an existing 'runs/' is far more likely a mistyped folder than a Hub repo.
        raise ModelError(f"adapter folder '{repo}' does not exist",
                         fix="check the path (a Hub id 'user/name' must not start with a local folder's name)")
    with hub_errors(f"download adapter '{ref}' from the Hub", token):
        try:
            info = _api(endpoint, token).model_info(ref.repo_id, revision=ref.revision)
        except (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.TimeoutException):
            # No Hub: an earlier download of this reference in the cache still serves.
            info = None
            prefix = f"{ref.subfolder}/" if ref.subfolder else ""
            # Only the files every adapter has: the snapshot may hold other folders' files we never fetched.
            root = _snapshot(ref, [prefix + ADAPTER_WEIGHTS, prefix + "adapter_config.json"], revision=ref.revision,
                             endpoint=endpoint, token=token, cache_dir=cache_dir, local_only=True)
        if info is not None:
            files = _select([s.rfilename for s in info.siblings or []], ref)
            # The reference's own revision (not info.sha): the cache then records branch -> commit, which is
            # what finds this copy again offline.
            root = _snapshot(ref, files, revision=ref.revision, endpoint=endpoint, token=token, cache_dir=cache_dir)
    folder = root / ref.subfolder if ref.subfolder else root
    if not (folder / ADAPTER_WEIGHTS).is_file():
        names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        _select(names, ref)  # raises the precise reason
    return folder


def pull(repo: str, dest: str | Path, *, endpoint: str | None = None, token: str | None = None,
         cache_dir: str | Path | None = None) -> list[Path]:
    """Copy a Hub adapter repo (or one subfolder of it) into `dest`, safe files only. Returns the adapter
    folders inside `dest` (dest itself and/or its role subfolders)."""
    ref = parse_ref(repo)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelError(f"'{dest}' already exists and is not empty", fix="choose a new folder, or delete it first")
    token = hub_token(token)
    with hub_errors(f"pull '{ref}' from the Hub", token):
        info = _api(endpoint, token).model_info(ref.repo_id, revision=ref.revision)
        names = [s.rfilename for s in info.siblings or []]
        prefix = f"{ref.subfolder}/" if ref.subfolder else ""
        wanted = [n for n in names if n.startswith(prefix) and n.endswith(SAFE_SUFFIXES)]
        if not any(n.endswith(ADAPTER_WEIGHTS) for n in wanted):
            _select(names, ref)  # raises: pickles only, or no adapter at all
        root = _snapshot(ref, wanted, revision=ref.revision, endpoint=endpoint, token=token, cache_dir=cache_dir)
    # Copy into a temporary sibling, then rename: an interrupted pull leaves no half-filled `dest`.
    with atomic_folder(dest) as tmp:
        for name in wanted:
            target = tmp / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, target)  # follows the cache's symlinks: real files in dest
    return sorted(p.parent for p in dest.rglob(ADAPTER_WEIGHTS))
