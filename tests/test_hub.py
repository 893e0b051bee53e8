"""`deltamem-edge pull` against a loopback server that speaks the Hugging Face Hub's HTTP protocol.

The real CLI runs in subprocesses with the real huggingface_hub pointed at the server
with HF_ENDPOINT (it reads it at import time), its cache in HF_HOME and our data
dir in DELTAMEM_DATA, both under tmp.  The server implements the endpoints
huggingface_hub uses for our calls, answering like the hub does:

* ``GET /api/models/{repo}[/revision/{rev}]?blobs=true``  model_info / repo_info: commit + file list with
  sizes, git blob ids and LFS sha256s;
* ``GET /api/models/{repo}/tree/{commit}?recursive=true``  list_repo_tree (snapshot_download's listing, one page);
* ``HEAD /{repo}/resolve/{rev}/{file}``  file metadata: X-Repo-Commit, ETag, and for LFS files
  X-Linked-Etag / X-Linked-Size (the sha256 and size huggingface_hub names the cached blob after);
* ``GET /{repo}/resolve/{rev}/{file}``  the bytes (for the "corrupt" repository: other bytes than
  the ones it advertises, of the same length).

Unknown repositories, revisions and files get 404 with the hub's X-Error-Code.  Every
request is logged, so "downloads nothing" and "no network call" are counted, not assumed.
The repositories hold a tiny random qwen3 GGUF (two quantizations) and upstream-format
δ-mem adapters written with torch.save, as upstream saves them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ggufs import base_shapes, random_adapter_weights, write_tiny_model

from deltamem_edge.errors import HubError
from deltamem_edge.fingerprint import adapter_fingerprint
from deltamem_edge.hub.bases import available_quants, pick_gguf

torch = pytest.importorskip("torch")  # test-only: writes the adapters exactly as upstream's torch.save does
uvicorn = pytest.importorskip("uvicorn")
starlette = pytest.importorskip("starlette")
pytest.importorskip("huggingface_hub")

ADAPTER = "test-org/delta-mem_tiny"
BASE_ID = "test-org/tiny-base"
BASE_GGUF = "test-org/tiny-base-GGUF"
LFS_SUFFIXES = (".gguf", ".pt", ".safetensors", ".bin")


# --------------------------------------------------------------------------------------------
# the fake hub
# --------------------------------------------------------------------------------------------


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RepoFile:
    data: bytes
    served: bytes | None = None  # what GET sends, when it is not `data` (a corrupt mirror)


@dataclass
class FakeHub:
    repos: dict[str, dict[str, RepoFile]] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos[repo] = {name: RepoFile(data) for name, data in files.items()}

    def commit(self, repo: str) -> str:
        h = hashlib.sha1(repo.encode())
        for name, f in sorted(self.repos[repo].items()):
            h.update(name.encode() + hashlib.sha256(f.data).digest())
        return h.hexdigest()

    def mark(self) -> int:
        return len(self.log)

    def since(self, mark: int) -> list[tuple[str, str]]:
        return self.log[mark:]


def _is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def make_app(hub: FakeHub) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def not_found(code: str, repo: str | None = None) -> Response:
        headers = {"X-Error-Code": code, "X-Error-Message": code}
        if repo is not None and code == "EntryNotFound":
            headers["X-Repo-Commit"] = hub.commit(repo)
        return JSONResponse({"error": code}, status_code=404, headers=headers)

    def lookup(request: Request) -> tuple[str, str | None, Response | None]:
        repo = f"{request.path_params['org']}/{request.path_params['name']}"
        hub.log.append((request.method, request.url.path))
        if repo not in hub.repos:
            return repo, None, not_found("RepoNotFound")
        rev = request.path_params.get("rev", "main")
        if rev not in ("main", hub.commit(repo)):
            return repo, None, not_found("RevisionNotFound")
        return repo, rev, None

    async def model_info(request: Request) -> Response:
        repo, _, error = lookup(request)
        if error is not None:
            return error
        siblings = []
        for name, f in sorted(hub.repos[repo].items()):
            s: dict[str, Any] = {"rfilename": name}
            if request.query_params.get("blobs"):
                s.update(size=len(f.data), blobId=git_blob_id(f.data))
                if _is_lfs(name):
                    s["lfs"] = {"sha256": hashlib.sha256(f.data).hexdigest(), "size": len(f.data), "pointerSize": 134}
            siblings.append(s)
        return JSONResponse({"id": repo, "modelId": repo, "sha": hub.commit(repo), "private": False,
                             "siblings": siblings})

    async def tree(request: Request) -> Response:
        repo, _, error = lookup(request)
        if error is not None:
            return error
        entries = []
        for name, f in sorted(hub.repos[repo].items()):
            e: dict[str, Any] = {"type": "file", "oid": git_blob_id(f.data), "size": len(f.data), "path": name}
            if _is_lfs(name):
                e["lfs"] = {"oid": hashlib.sha256(f.data).hexdigest(), "size": len(f.data), "pointerSize": 134}
            entries.append(e)
        return JSONResponse(entries)

    async def resolve(request: Request) -> Response:
        repo, _, error = lookup(request)
        if error is not None:
            return error
        f = hub.repos[repo].get(request.path_params["path"])
        if f is None:
            return not_found("EntryNotFound", repo)
        body = f.data if f.served is None else f.served
        headers = {"X-Repo-Commit": hub.commit(repo), "Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
        if _is_lfs(request.path_params["path"]):
            sha = hashlib.sha256(f.data).hexdigest()  # what the hub knows, whatever the mirror sends
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(f.data))})
        else:
            headers["ETag"] = f'"{git_blob_id(f.data)}"'
        if request.method == "HEAD":
            return Response(b"", headers=headers)
        return Response(body, headers=headers, media_type="application/octet-stream")

    return Starlette(routes=[
        Route("/api/models/{org}/{name}/revision/{rev}", model_info),
        Route("/api/models/{org}/{name}", model_info),
        Route("/api/models/{org}/{name}/tree/{rev}", tree),
        Route("/{org}/{name}/resolve/{rev}/{path:path}", resolve, methods=["GET", "HEAD"]),
    ])


@pytest.fixture(scope="module")
def server() -> Any:
    hub = FakeHub()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(hub), log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "the fake hub did not start"
        time.sleep(0.02)
    hub.url = f"http://127.0.0.1:{port}"
    yield hub
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


# --------------------------------------------------------------------------------------------
# repositories: a tiny base in two quantizations, upstream-format adapters
# --------------------------------------------------------------------------------------------


def upstream_state_dict(base: Path, seed: int) -> dict[str, Any]:
    """Upstream's saved keys, random non-zero; the inactive δ heads (k, v) are zeros, as upstream saves them."""
    out = base_shapes(base)["out"]
    sd: dict[str, Any] = {}
    for il, layer in random_adapter_weights(base, rank=4, delta_heads="q,o", seed=seed).items():
        p = f"model.layers.{il}.self_attn."
        for h in "kv":
            layer.setdefault(f"delta_{h}_proj", np.zeros((out[h], 4), np.float32))
        sd.update({p + k: torch.from_numpy(v.copy()) for k, v in layer.items()})
    return sd


def torch_save(sd: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


CONFIG = {"rank": 4, "alpha": 8.0, "num_state_heads": 1, "delta_heads": ["q", "o"], "couple_lambda": True,
          "state_update_mode": "standard", "rankwise_gates": True, "memory_write_granularity": "token",
          "normalize_qk": True, "target_modules": ["self_attn"], "target_layers": [], "beta_bias_init": -1.5}


def card(base_model: str | None) -> bytes:
    head = f"---\nbase_model: {base_model}\nlibrary_name: delta-mem\n---\n" if base_model else ""
    return (head + "# a tiny δ-mem adapter for tests\n").encode()


def adapter_repo(weights: bytes, base_model: str | None = BASE_ID) -> dict[str, bytes]:
    return {"delta_mem_config.json": json.dumps(CONFIG, indent=2).encode(), "delta_mem_adapter.pt": weights,
            "README.md": card(base_model), ".gitattributes": b"*.pt filter=lfs diff=lfs merge=lfs -text\n"}


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> Any:
        return (os.system, (self.cmd,))


def with_pickle(pt: bytes, payload: bytes) -> bytes:
    """A genuine torch.save zip whose data.pkl is ``payload`` (every other entry kept)."""
    src, out = zipfile.ZipFile(io.BytesIO(pt)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info, payload if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


@pytest.fixture(scope="module")
def world(server: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("hub")
    q8 = write_tiny_model(d / "tiny-base-Q8_0.gguf", "qwen3", chat_tokenizer=True, ftype="q8_0")
    f16 = write_tiny_model(d / "tiny-base-F16.gguf", "qwen3", chat_tokenizer=True, ftype="f16")
    wide = write_tiny_model(d / "wide.gguf", "qwen3", n_embd=128, n_head=8, chat_tokenizer=True)
    server.add(BASE_GGUF, {q8.name: q8.read_bytes(), f16.name: f16.read_bytes(), "README.md": b"# tiny base\n"})

    good = torch_save(upstream_state_dict(q8, seed=1))
    server.add(ADAPTER, adapter_repo(good))
    server.add("test-org/delta-mem_never", adapter_repo(torch_save(upstream_state_dict(q8, seed=2))))
    corrupt = torch_save(upstream_state_dict(q8, seed=3))
    server.add("test-org/delta-mem_corrupt", adapter_repo(corrupt))
    flipped = bytearray(corrupt)
    flipped[len(flipped) // 2] ^= 0xFF  # inside the weights: same length, other bytes
    server.repos["test-org/delta-mem_corrupt"]["delta_mem_adapter.pt"].served = bytes(flipped)

    marker = d / "pwned"
    evil = pickle.dumps({"model.layers.0.self_attn.memory_q_proj": _Evil(f"touch {marker}")}, protocol=2)
    server.add("test-org/delta-mem_evil", adapter_repo(with_pickle(good, evil)))
    server.add("test-org/delta-mem_nobase", adapter_repo(good, base_model=None))
    server.add("test-org/delta-mem_wide", adapter_repo(torch_save(upstream_state_dict(wide, seed=4))))
    server.add("test-org/not-an-adapter", {"README.md": card(BASE_ID), "model.safetensors": b"\0" * 64})

    data = d / "data"
    data.mkdir()
    (data / "bases.json").write_text(json.dumps({BASE_ID: BASE_GGUF}))  # the user's extension of the table
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "DELTAMEM_DATA"))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(d / "hf"), HF_HUB_DISABLE_TELEMETRY="1", DELTAMEM_DATA=str(data),
               PYTHONUNBUFFERED="1", HF_HUB_DISABLE_XET="1")
    return {"dir": d, "data": data, "env": env, "q8": q8, "marker": marker, "good": good}


def cli(world: dict[str, Any], *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deltamem_edge", *args], input=stdin, capture_output=True,
                          text=True, timeout=180, env={**world["env"], **env})


def registry(world: dict[str, Any], data: Path | None = None) -> dict[str, Any]:
    path = (data or world["data"]) / "models.json"
    return json.loads(path.read_text())["models"] if path.exists() else {}


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's promise for a refusal: exit 1, no traceback, one 'error:' line (plus a hint)."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def resolves(log: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [r for r in log if "/resolve/" in r[1]]


@pytest.fixture(scope="module")
def installed(world: dict[str, Any], server: FakeHub) -> dict[str, Any]:
    mark = server.mark()
    proc = cli(world, "pull", f"{ADAPTER}:q8_0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"proc": proc, "log": server.since(mark), "entry": registry(world)["delta-mem_tiny"]}


# --------------------------------------------------------------------------------------------
# pull → chat
# --------------------------------------------------------------------------------------------


def test_pull_downloads_checks_converts_and_registers(world, installed):
    entry, log = installed["entry"], installed["log"]
    assert entry["adapter_repo"] == ADAPTER and entry["base_repo"] == BASE_GGUF and entry["quant"] == "Q8_0"
    assert entry["base_model"] == BASE_ID  # from the model card, through bases.json
    assert Path(entry["model"]).name == "tiny-base-Q8_0.gguf"
    assert Path(entry["model"]).read_bytes() == world["q8"].read_bytes()
    adapter = Path(entry["adapter"])
    assert adapter.parent == world["data"] / "models" / "delta-mem_tiny"
    assert entry["adapter_fingerprint"] == adapter_fingerprint(adapter).hex()
    assert entry["size"] == adapter.stat().st_size + world["q8"].stat().st_size
    # each chosen file fetched once; the other quantization and the .gitattributes never
    gets = sorted(p.rsplit("/", 1)[-1] for m, p in resolves(log) if m == "GET")
    assert gets == ["README.md", "delta_mem_adapter.pt", "delta_mem_config.json", "tiny-base-Q8_0.gguf"]
    assert not any("F16" in p for _, p in log)
    assert "installed delta-mem_tiny" in installed["proc"].stdout


def test_chat_by_name_makes_no_network_call(world, installed, server):
    mark = server.mark()
    proc = cli(world, "chat", "-m", "delta-mem_tiny", "-n", "4", "--temp", "0", "-c", "256", "-t", "1",
               stdin="Hello there\n/quit\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model: delta-mem_tiny" in proc.stdout and installed["entry"]["adapter"] in proc.stdout
    assert "memory saved:" in proc.stdout and "(1 turn," in proc.stdout
    assert (world["data"] / "memories" / "delta-mem_tiny.state").is_file()  # one memory per installed name
    assert server.since(mark) == []


def test_second_pull_downloads_nothing(world, installed, server):
    mark = server.mark()
    proc = cli(world, "pull", f"{ADAPTER}:Q8_0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = server.since(mark)
    assert resolves(log) == []  # neither GET nor HEAD: the files are cached at that commit
    assert all(m == "GET" and p.startswith("/api/models/") for m, p in log)  # listings only: which commit is main
    again = registry(world)["delta-mem_tiny"]
    assert again["adapter_fingerprint"] == installed["entry"]["adapter_fingerprint"]
    assert Path(again["adapter"]).is_file()


def test_list_shows_installed_models(world, installed):
    proc = cli(world, "list")
    assert proc.returncode == 0, proc.stderr
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("delta-mem_tiny "))
    for part in (BASE_ID, "Q8_0", "KiB", installed["entry"]["adapter_fingerprint"][:16]):
        assert part in row


def test_chat_hf_pulls_on_first_use_then_uses_the_install(world, installed, server, tmp_path):
    fresh = tmp_path / "data"
    fresh.mkdir()
    (fresh / "bases.json").write_text(json.dumps({BASE_ID: BASE_GGUF}))
    args = ("chat", "-hf", f"{ADAPTER}:Q8_0", "-n", "2", "--temp", "0", "-c", "256", "-t", "1", "--memory", "none")
    mark = server.mark()
    first = cli(world, *args, stdin="/quit\n", DELTAMEM_DATA=str(fresh))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "delta-mem_tiny" in registry(world, fresh)
    assert resolves(server.since(mark)) == []  # a pull, but from the warm hub cache
    mark = server.mark()
    second = cli(world, *args, stdin="/quit\n", DELTAMEM_DATA=str(fresh))
    assert second.returncode == 0, second.stdout + second.stderr
    assert server.since(mark) == []  # installed: not even a listing


# --------------------------------------------------------------------------------------------
# offline
# --------------------------------------------------------------------------------------------


def test_offline_uses_the_cache_and_fails_clearly_without_it(world, installed, server):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: connection refused
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": dead}
    mark = server.mark()
    try:
        chat = cli(world, "chat", "-m", "delta-mem_tiny", "-n", "2", "--temp", "0", "-c", "256", "-t", "1",
                   "--memory", "none", stdin="Hi\n/quit\n", **offline)
        assert chat.returncode == 0, chat.stdout + chat.stderr

        again = cli(world, "pull", f"{ADAPTER}:Q8_0", "--name", "tiny-offline", **offline)
        assert again.returncode == 0, again.stdout + again.stderr
        copy = registry(world)["tiny-offline"]
        assert copy["adapter_revision"] == installed["entry"]["adapter_revision"]
        assert copy["adapter_fingerprint"] == installed["entry"]["adapter_fingerprint"]

        before = registry(world)
        missing = cli(world, "pull", "test-org/delta-mem_never:Q8_0", **offline)
        line = one_error(missing)
        assert "test-org/delta-mem_never" in line and "not in the local Hugging Face cache" in line
        assert "HF_HUB_OFFLINE=1" in line
        assert registry(world) == before
    finally:
        closed.close()
    assert server.since(mark) == []


# --------------------------------------------------------------------------------------------
# refusals: nothing half-installed
# --------------------------------------------------------------------------------------------


def _cache_blobs(world: dict[str, Any], repo: str) -> list[Path]:
    folder = world["dir"] / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_corrupted_download_is_refused_and_nothing_is_registered(world, server):
    repo = "test-org/delta-mem_corrupt"
    line = one_error(cli(world, "pull", f"{repo}:Q8_0"))
    assert repo in line and "delta_mem_adapter.pt" in line and "sha256" in line
    assert "delta-mem_corrupt" not in registry(world)
    assert not (world["data"] / "models" / "delta-mem_corrupt").exists()
    good_sha = hashlib.sha256(server.repos[repo]["delta_mem_adapter.pt"].data).hexdigest()
    assert good_sha not in [p.name for p in _cache_blobs(world, repo)]  # the bad blob left the cache

    server.repos[repo]["delta_mem_adapter.pt"].served = None  # the mirror is fixed: a retry downloads it anew
    proc = cli(world, "pull", f"{repo}:Q8_0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert good_sha in [p.name for p in _cache_blobs(world, repo)]
    assert "delta-mem_corrupt" in registry(world)

    # offline, the cached blob is checked against the hash it is named after: a blob damaged on disk is refused
    blob = next(p for p in _cache_blobs(world, repo) if p.name == good_sha)
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 3] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(damaged))
    line = one_error(cli(world, "pull", f"{repo}:Q8_0", "--name", "corrupt-offline", HF_HUB_OFFLINE="1"))
    assert repo in line and "sha256" in line
    assert "corrupt-offline" not in registry(world) and not blob.exists()


def test_malicious_pickle_in_a_repo_is_refused_without_running_it(world, server):
    repo = "test-org/delta-mem_evil"
    pt = server.repos[repo]["delta_mem_adapter.pt"].data
    payload = zipfile.ZipFile(io.BytesIO(pt)).read(next(n for n in zipfile.ZipFile(io.BytesIO(pt)).namelist()
                                                         if n.endswith("/data.pkl")))
    assert b"system" in payload and str(world["marker"]).encode() in payload  # plain pickle.load would run it
    line = one_error(cli(world, "pull", f"{repo}:Q8_0"))
    assert repo in line and "system" in line and "delta_mem_adapter.pt" in line, line
    assert not world["marker"].exists()
    assert "delta-mem_evil" not in registry(world)
    assert not (world["data"] / "models" / "delta-mem_evil").exists()


@pytest.mark.parametrize(("spec", "extra", "names", "says"), [
    ("test-org/not-an-adapter", (), "test-org/not-an-adapter", "no delta_mem_config.json"),
    ("test-org/delta-mem_nobase", (), "test-org/delta-mem_nobase", "--base"),
    ("test-org/no-such-repo", (), "test-org/no-such-repo", "no such model repository"),
    (f"{ADAPTER}:Q5_K_M", ("--name", "tiny-q5"), BASE_GGUF, "no Q5_K_M GGUF"),  # the base repo lacks it
    ("test-org/delta-mem_wide:Q8_0", (), "test-org/delta-mem_wide", "does not fit"),
    (ADAPTER, ("--revision", "v9", "--name", "tiny-v9"), ADAPTER, "no revision 'v9'"),
], ids=["no-config", "no-base", "missing-repo", "missing-quant", "wrong-shape", "missing-revision"])
def test_wrong_repositories_give_one_clear_error(world, spec, extra, names, says):
    models_dir = world["data"] / "models"
    before = registry(world), sorted(models_dir.iterdir()) if models_dir.exists() else []
    proc = cli(world, "pull", spec, *extra)
    line = one_error(proc)
    assert names in line and says in proc.stderr, proc.stderr  # says: in the error or its hint
    assert (registry(world), sorted(models_dir.iterdir()) if models_dir.exists() else []) == before


def test_missing_quant_error_lists_the_available_ones(world):
    line = one_error(cli(world, "pull", f"{ADAPTER}:Q5_K_M", "--name", "tiny-q5"))
    assert "F16" in line and "Q8_0" in line


def test_local_base_file(world, installed):
    proc = cli(world, "pull", "test-org/delta-mem_nobase", "--base", str(world["q8"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entry = registry(world)["delta-mem_nobase"]
    assert entry["model"] == str(world["q8"].resolve()) and entry["base_repo"] == "" and entry["quant"] == "Q8_0"
    # the same weights as delta-mem_tiny on the same base: the same adapter
    assert entry["adapter_fingerprint"] == installed["entry"]["adapter_fingerprint"]


def test_unknown_name_is_one_error(world, installed):
    line = one_error(cli(world, "chat", "-m", "no-such-model"))
    assert "no-such-model" in line and "delta-mem_tiny" in line


# --------------------------------------------------------------------------------------------
# choosing the GGUF file (no server)
# --------------------------------------------------------------------------------------------


def test_pick_gguf_matches_the_quant_as_a_whole_word():
    files = ["README.md", "m-Q4_0.gguf", "m-Q4_0_4_4.gguf", "m-q4_k_m.gguf", "mmproj-m-Q4_K_M.gguf", "m-Q8_0.gguf",
             "Q6_K/m-Q6_K-00001-of-00002.gguf", "Q6_K/m-Q6_K-00002-of-00002.gguf", "m-Q5_K_M-00001-of-00002.gguf"]
    assert pick_gguf(files, "Q4_0", "r") == ["m-Q4_0.gguf"]
    assert pick_gguf(files, "Q4_K_M", "r") == ["m-q4_k_m.gguf"]  # case-insensitive, projector ignored
    assert pick_gguf(files, "Q6_K", "r") == ["Q6_K/m-Q6_K-00001-of-00002.gguf", "Q6_K/m-Q6_K-00002-of-00002.gguf"]
    with pytest.raises(HubError, match="parts"):
        pick_gguf(files, "Q5_K_M", "r")  # half a split model
    with pytest.raises(HubError, match="no IQ2_XS GGUF"):
        pick_gguf(files, "IQ2_XS", "r")
    with pytest.raises(HubError, match="several"):
        pick_gguf(["a-Q8_0.gguf", "b-Q8_0.gguf"], "Q8_0", "r")
    assert available_quants(files) == ["Q4_0", "Q4_0_4_4", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
