"""``deltamem-edge serve``: an OpenAI-compatible HTTP server, one persistent memory per user.

Flag names follow llama-server (--host, --port, --api-key, --api-key-file, -np, -c, -ngl).
Safe desktop defaults: loopback only, CORS off, and a warning when the server listens
beyond loopback without an API key.  docs/server.md has the details.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from . import _options
from .chat import data_dir


def default_memory_dir() -> Path:
    return data_dir() / "server-memories"


def _read_keys(api_key: str | None, api_key_file: Path | None) -> list[str]:
    if api_key and api_key_file:
        raise typer.BadParameter("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            text = api_key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise typer.BadParameter(f"--api-key-file: cannot read {api_key_file}: {exc.strerror}") from None
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not keys:
            raise typer.BadParameter(f"--api-key-file: {api_key_file} holds no key")
        return keys
    return [k.strip() for k in api_key.split(",") if k.strip()] if api_key else []


def serve(
    model: Path = typer.Option(None, "--model", "-m", help="Model GGUF, or the name of an installed model (`deltamem-edge list`; default: the embedded SmolLM2-135M-Instruct)."),
    adapter: Path = typer.Option(None, "--adapter", "-a", help="δ-mem adapter GGUF (default: bundled, or <model>.dmem.gguf next to it)."),
    hf_repo: str = typer.Option(None, "--hf-repo", "-hf", help="δ-mem adapter repository on the Hugging Face Hub, REPO[:QUANT]: the installed model pulled from it, pulled now if there is none."),
    memory_dir: Path = typer.Option(None, "--memory-dir", help="Where the memory files live (default: ~/.local/share/deltamem-edge/server-memories)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: loopback only)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    api_key: str = typer.Option(None, "--api-key", envvar="DELTAMEM_API_KEY", help="API key (comma-separated for several); every route but /health then needs it."),
    api_key_file: Path = typer.Option(None, "--api-key-file", help="File with one API key per line."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Allow browser requests from this origin (repeatable); CORS is off by default."),
    parallel: int = typer.Option(4, "--parallel", "-np", min=1, max=64, help="Sequences in the context: users served at once (idle memories leave LRU-first)."),
    ctx_size: int = typer.Option(8192, "--ctx-size", "-c", min=64, help="Context size in tokens, shared: each sequence gets ctx/np."),
    predict: int = typer.Option(512, "--predict", "-n", min=1, help="Default max tokens per reply (a request's max_tokens overrides it)."),
    threads: int = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: all cores, at most 8)."),
    gpu_layers: int = _options.gpu_layers_option(),
    rpc: str = _options.rpc_option(),
    tensor_split: str = _options.tensor_split_option(),
    temp: float = typer.Option(0.8, "--temp", min=0.0, max=2.0, help="Default temperature (a request's temperature overrides it)."),
    top_k: int = typer.Option(40, "--top-k", min=0),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    min_p: float = typer.Option(0.05, "--min-p", min=0.0, max=1.0),
    transcript_turns: int = typer.Option(8, "--transcript-turns", min=0, help="Recent turns kept as text in each memory file."),
    max_body: int = typer.Option(1024 * 1024, "--max-body-bytes", min=1024, help="Largest request body accepted."),
) -> None:
    """Serve an OpenAI-compatible API whose memory per user persists in small state files."""
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise typer.BadParameter("the server needs its extra: pip install 'deltamem-edge[server]'") from None
    from deltamem_edge import defaults
    from deltamem_edge.conversation import Conversation
    from deltamem_edge.engine import Engine
    from deltamem_edge.hub.resolve import resolve_model
    from deltamem_edge.server.app import ServerState, create_app
    from deltamem_edge.server.completion import SamplingDefaults
    from deltamem_edge.server.memories import MemoryPool
    from deltamem_edge.server.protocol import Limits

    keys = _read_keys(api_key, api_key_file)
    resolved = resolve_model(model, adapter, hf=hf_repo)
    model, adapter = resolved.model, resolved.adapter
    if model is None:
        model = defaults.default_model_path()
        if adapter is None:
            adapter = defaults.default_adapter_path()
    directory = (memory_dir or default_memory_dir()).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    per_seq = ctx_size // parallel
    if per_seq < 64:
        raise typer.BadParameter(f"--ctx-size {ctx_size} / -np {parallel} leaves {per_seq} tokens per user; give at least 64")

    engine = Engine(model, adapter, n_ctx=ctx_size, n_threads=threads, n_gpu_layers=gpu_layers, n_seq_max=parallel,
                    rpc_servers=rpc, tensor_split=_options.float_list(tensor_split, "--tensor-split"),
                    kv_unified=False)  # a KV stream per user: their next tokens share one decode step
    if engine.adapter is None:
        engine.close()
        raise typer.BadParameter("this model has no δ-mem adapter: pass --adapter (or a bundled model)")
    name = resolved.name or model.name.removesuffix(".gguf")

    def open_conversation(path: Path | None) -> Conversation:
        return Conversation(engine, path, system="", max_new_tokens=predict, transcript_turns=transcript_turns,
                            context_limit=per_seq, model_label=name)

    pool = MemoryPool(directory, parallel, open_conversation)
    state = ServerState(engine=engine, pool=pool, model_name=name,
                        limits=Limits(max_tokens=per_seq, default_max_tokens=min(predict, per_seq)),
                        sampling=SamplingDefaults(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p),
                        max_body_bytes=max_body)
    app = create_app(state, api_keys=keys, cors_origins=cors_origin)

    if not _options.is_loopback(host) and not keys:
        print(f"warning: listening on {host} without an API key: anyone who can reach this port can chat and "
              "read or delete memories; pass --api-key or --api-key-file", file=sys.stderr)
    if "*" in cors_origin:
        print("warning: --cors-origin '*' lets any web page you visit call this server", file=sys.stderr)
    print(f"deltamem-edge serve · model {name} · adapter {engine.adapter.path.name} · {parallel} sequences × "
          f"{per_seq} tokens · memories in {directory}", file=sys.stderr)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:  # SIGTERM / Ctrl-C: stop replies now, each saves
            state.stop_all()
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            for server in self.servers if self.started else ():
                for sock in server.sockets:  # the real port, also when --port 0 picked one
                    addr = sock.getsockname()
                    print(f"listening on http://{addr[0]}:{addr[1]}", file=sys.stderr, flush=True)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10, lifespan="on")
    server = _Server(config)
    server.run()
    if not server.started:
        raise typer.Exit(1)


def register(app: typer.Typer, convert_app: typer.Typer) -> None:
    app.command("serve")(serve)
