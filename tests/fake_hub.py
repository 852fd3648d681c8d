"""A stand-in for the Hugging Face Hub, served by the stdlib http.server on 127.0.0.1 in a thread.

It answers the endpoints huggingface_hub 2.4 calls for `push` and `pull`, read from its source
(hf_api.py, _commit_api.py, file_download.py, _snapshot_download.py):

    POST /api/repos/create                       create_repo (409 when it exists; exist_ok swallows it)
    POST /api/validate-yaml                      create_commit validates README.md's metadata first
    POST /api/models/{repo}/branch/{branch}      create_branch
    POST /api/models/{repo}/preupload/{rev}      upload modes: we answer "regular" for every file, so file
                                                 content travels base64 inside the commit (no LFS/Xet server)
    POST /api/models/{repo}/commit/{rev}         the ndjson commit
    GET  /api/models/{repo}[/revision/{rev}]     model_info / repo_info
    GET  /api/models/{repo}/tree/{rev}           list_repo_tree (snapshot_download)
    HEAD|GET /{repo}/resolve/{rev}/{path}        hf_hub_download

Repos live in memory: branch -> commit -> {path: bytes}. Writes need `Authorization: Bearer <token>`; a
private repo needs it to be read. Every request is recorded (method, path, whether it carried the token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    messages: dict[str, str] = field(default_factory=dict)  # sha -> commit summary

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.commits else None


@dataclass
class FakeHub:
    token: str
    url: str = ""
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, bool]] = field(default_factory=list)
    echo_auth_on_commit: bool = False
    """Make the commit endpoint fail with an error echoing the Authorization header (tests redaction)."""

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> None:
        """Seed a repo directly (e.g. one holding only a pickled adapter_model.bin)."""
        repo = self.repos.setdefault(repo_id, _new_repo(private))
        _commit(repo, "main", files, "seed")


def _new_repo(private: bool) -> Repo:
    repo = Repo(private=private)
    _commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "init")
    return repo


def _commit(repo: Repo, branch: str, changes: dict[str, bytes], message: str) -> str:
    parent = repo.branches.get(branch)
    files = {**(repo.commits[parent] if parent else {}), **changes}
    digest = hashlib.sha1(repr((parent, sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))).encode())
    sha = digest.hexdigest()
    repo.commits[sha] = files
    repo.messages[sha] = message
    repo.branches[branch] = sha
    return sha


def _blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _repo(self, repo_id: str, write: bool) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if write and not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and not self._authorized()):
            self._error(404 if repo is None else 401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _route(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self.hub.requests.append((self.command, path, self._authorized()))
        segs = path.strip("/").split("/")
        if self.command == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if self.command == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml()
        if segs[:2] == ["api", "models"] and len(segs) >= 4:
            repo_id = "/".join(segs[2:4])
            action, rest = (segs[4], "/".join(segs[5:])) if len(segs) > 4 else ("info", "")
            if self.command == "GET" and action in ("info", "revision"):
                return self._model_info(repo_id, rest or "main")
            if self.command == "GET" and action == "tree":
                return self._tree(repo_id, rest)
            if self.command == "POST" and action == "branch":
                return self._branch(repo_id, rest)
            if self.command == "POST" and action == "preupload":
                return self._preupload(repo_id, rest)
            if self.command == "POST" and action == "commit":
                return self._commit(repo_id, rest)
        if len(segs) >= 5 and segs[2] == "resolve" and self.command in ("GET", "HEAD"):
            return self._resolve("/".join(segs[:2]), segs[3], "/".join(segs[4:]))
        self._error(404, None, f"fake hub: no route for {self.command} {path}")

    do_GET = do_POST = do_HEAD = _route

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self) -> None:
        payload = json.loads(self._body() or b"{}")
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.hub.repos:
            return self._error(409, None, "You already created this model repo")
        self.hub.repos[repo_id] = _new_repo(payload.get("visibility") == "private")
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        errors = []
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content.split("---\n")[1]) or {}
                if not isinstance(meta.get("tags", []), list):
                    errors.append({"message": "tags must be a list"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _branch(self, repo_id: str, branch: str) -> None:
        body = json.loads(self._body() or b"{}")
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, None, "Branch already exists")
        start = repo.resolve(body.get("startingPoint") or "main")
        repo.branches[branch] = start
        self._json(200, {})

    def _preupload(self, repo_id: str, rev: str) -> None:
        body = json.loads(self._body())
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        current = repo.commits.get(repo.resolve(rev) or "", {})
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": _blob_id(current[f["path"]]) if f["path"] in current else None} for f in body["files"]]
        self._json(200, {"files": files})

    def _commit(self, repo_id: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if self.hub.echo_auth_on_commit:  # in the body only: a real server would not echo it in headers either
            return self._json(400, {"error": f"commit rejected for {self.headers.get('Authorization')}"})
        if rev not in repo.branches:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        header, changes = {}, {}
        for line in lines:
            if line["key"] == "header":
                header = line["value"]
            elif line["key"] == "file":
                changes[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            else:
                return self._error(400, None, f"fake hub supports regular files only, got {line['key']}")
        sha = _commit(repo, rev, changes, header.get("summary", ""))
        self._json(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "success": True})

    def _model_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, write=False)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        files = repo.commits[sha]
        card = files.get("README.md", b"").decode()
        card_data = yaml.safe_load(card.split("---\n")[1]) if card.startswith("---\n") else None
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                         "cardData": card_data, "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _tree(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, write=False)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        files = repo.commits[sha]
        folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
        entries = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                   for d in folders]
        entries += [{"type": "file", "path": p, "oid": _blob_id(c), "size": len(c)} for p, c in sorted(files.items())]
        self._json(200, entries)

    def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
        repo = self._repo(repo_id, write=False)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        content = repo.commits[sha].get(filename)
        if content is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        self._send(200, content, {"X-Repo-Commit": sha, "ETag": f'"{_blob_id(content)}"'},
                   content_type="application/octet-stream")


class FakeHubServer:
    """`with FakeHubServer(token) as hub:` serves a FakeHub on a free port of 127.0.0.1."""

    def __init__(self, token: str):
        self.hub = FakeHub(token=token)
        handler = type("Handler", (_Handler,), {"hub": self.hub})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.hub.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self.hub

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------------------- run folders
EVAL_REPORT = ("# Evaluation report\n\n## Policies\n\n| policy | RM score | KL to ref (nats) |\n|---|---|---|\n"
               "| ppo | 0.41 | 2.3 |\n\n![scores.png](scores.png)\n\n## Samples\n")


def make_run_folder(out: Path, base_dir: Path, quantization: str = "4bit") -> Path:
    """A run folder laid out as the stages write it (docs/FORMATS.md), built with SharedBase on a tiny base:
    OUT/sft, OUT/reward, OUT/ppo/{policy,value} (+ recipe/metrics once for PPO), OUT/eval/report.md, plus
    files that must never be uploaded (train.log, a pickled training_args.bin, a checkpoint folder)."""
    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

    sb = SharedBase.load(ModelConfig(name=str(base_dir), device="cpu"), QuantizationConfig(mode=quantization),
                         for_training=False)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    sb.add_adapter("policy", lora)
    sb.add_adapter("reward", lora)
    sb.add_head("reward")
    sb.add_adapter("value", lora)
    sb.add_head("value")
    recipe = f"model:\n  name: {base_dir}\nquantization:\n  mode: {quantization}\nlora:\n  r: 4\n"
    for stage, role, folder in (("sft", "policy", out / "sft"), ("reward", "reward", out / "reward")):
        sb.save_adapter(role, folder, stage, **({"reward_offset": 0.25} if role == "reward" else {}))
        (folder / "recipe.yaml").write_text(recipe)
        (folder / "metrics.json").write_text(json.dumps({"train_loss": 1.23456, "eval": {"accuracy": 0.75}}))
        (folder / "train.log").write_text("step 1 loss 2.0\n")
        (folder / "training_args.bin").write_bytes(b"\x80\x04pickled")
        (folder / "checkpoint-1").mkdir()
        (folder / "checkpoint-1" / "optimizer.pt").write_bytes(b"\x80\x04pickled")
    sb.save_adapter("policy", out / "ppo" / "policy", "ppo")
    sb.save_adapter("value", out / "ppo" / "value", "ppo")
    (out / "ppo" / "recipe.yaml").write_text(recipe + "ppo:\n  kl_coef: 0.05\n")
    (out / "ppo" / "metrics.json").write_text(json.dumps({"mean_reward": 0.41, "kl": 2.3}))
    (out / "eval").mkdir()
    (out / "eval" / "report.md").write_text(EVAL_REPORT)
    return out
