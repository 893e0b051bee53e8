"""``deltamem-edge chat``: an interactive conversation whose memory is a small state file.

Flag names follow llama.cpp where they exist (-m, -c, -n, -t, -ngl, --temp, --top-k,
--top-p, --min-p, -s).  With no --model the embedded default (SmolLM2-135M-Instruct
and its default adapter from models/) is used, and the first line names the adapter.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from . import _options
from ._words import count

HELP = """commands:
  /help          this list
  /stats         tokens written, turns, context use, per-layer state norms
  /save          write the memory file now (it is also written after every turn)
  /recall N      replay the last N turns of the saved transcript into the context (not written again)
  /reset         erase the memory (asks first)
  /quit          leave (Ctrl-D works too); Ctrl-C stops a reply, twice at the prompt leaves"""


def data_dir() -> Path:
    from deltamem_edge.paths import data_dir as _data_dir

    return _data_dir()


def default_memory_path(model: Path) -> Path:
    stem = model.name.removesuffix(".gguf").lower()
    return data_dir() / "memories" / f"{stem}.state"


def _progress(done: int, total: int) -> None:
    if total < 256:
        return
    width = 30
    filled = width * done // total
    end = "\n" if done >= total else ""
    print(f"\r  reading [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tokens", end=end,
          file=sys.stderr, flush=True)


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # pragma: no cover (Windows)
        return
    hist = data_dir() / "history"
    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        if hist.exists():
            readline.read_history_file(hist)
        readline.set_history_length(1000)
    except OSError:
        return
    import atexit

    atexit.register(lambda: _save_history(readline, hist))


def _save_history(readline, hist: Path) -> None:  # noqa: ANN001
    with contextlib.suppress(OSError):
        readline.write_history_file(hist)


def chat(
    model: Path = typer.Option(None, "--model", "-m", help="Model GGUF, or the name of an installed model (`deltamem-edge list`; default: the embedded SmolLM2-135M-Instruct)."),
    adapter: Path = typer.Option(None, "--adapter", "-a", help="δ-mem adapter GGUF (default: bundled in the model, or <model>.dmem.gguf next to it)."),
    hf_repo: str = typer.Option(None, "--hf-repo", "-hf", help="δ-mem adapter repository on the Hugging Face Hub, REPO[:QUANT]: the installed model pulled from it, pulled now if there is none."),
    memory: str = typer.Option(None, "--memory", help="Memory state file (default: one per model in ~/.local/share/deltamem-edge/memories; 'none' for no memory)."),
    ctx_size: int = typer.Option(4096, "--ctx-size", "-c", min=16, max=2**32 - 1, help="Context size in tokens."),
    predict: int = typer.Option(512, "--predict", "-n", min=0, max=2**31 - 1, help="Max tokens per reply."),
    threads: int = typer.Option(None, "--threads", "-t", min=1, max=4096, help="CPU threads (default: all cores, at most 8)."),
    gpu_layers: int = _options.gpu_layers_option(),
    rpc: str = _options.rpc_option(),
    tensor_split: str = _options.tensor_split_option(),
    temp: float = typer.Option(0.8, "--temp", help="Temperature (0 = greedy)."),
    top_k: int = typer.Option(40, "--top-k", min=0, max=2**31 - 1),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    min_p: float = typer.Option(0.05, "--min-p", min=0.0, max=1.0),
    seed: int = typer.Option(-1, "--seed", "-s", min=-1, max=2**32 - 1, help="Sampling seed (-1: random)."),
    system: str = typer.Option(None, "--system", help="System prompt."),
    recall_turns: int = typer.Option(0, "--recall-turns", min=0, max=2**31 - 1, help="Replay the last N saved turns into the context at start (read-only)."),
    readonly: bool = typer.Option(False, "--readonly", help="Read the memory but never change or save it."),
) -> None:
    """Chat with a model whose memory persists in a small state file."""
    from deltamem_edge import defaults
    from deltamem_edge.conversation import Conversation
    from deltamem_edge.engine import Engine
    from deltamem_edge.fingerprint import short
    from deltamem_edge.hub.resolve import resolve_model
    from deltamem_edge.sampling import SamplingParams

    resolved = resolve_model(model, adapter, hf=hf_repo)
    model, adapter = resolved.model, resolved.adapter
    embedded = model is None
    if embedded:
        model = defaults.default_model_path()
        if adapter is None:
            adapter = defaults.default_adapter_path()
    label = Path(f"{resolved.name}.gguf") if resolved.name else model  # an installed model's memory is per name
    mem_path = None if (memory or "").lower() == "none" else Path(memory) if memory else default_memory_path(label)
    if mem_path is not None:
        mem_path.parent.mkdir(parents=True, exist_ok=True)

    engine = Engine(model, adapter, n_ctx=ctx_size, n_threads=threads, n_gpu_layers=gpu_layers, rpc_servers=rpc,
                    tensor_split=_options.float_list(tensor_split, "--tensor-split"))
    sampling = SamplingParams(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    if engine.adapter is None and mem_path is not None:
        print("note: this model has no δ-mem adapter; chatting without memory", file=sys.stderr)
        mem_path = None
    conv = Conversation(engine, mem_path, system=system, sampling=sampling, max_new_tokens=predict,
                        readonly=readonly)
    try:
        if embedded:
            print(f"deltamem-edge chat · embedded default model: SmolLM2-135M-Instruct (Q4_1, {model})")
            if engine.adapter:
                print(f"  adapter: {defaults.default_adapter_label(engine.adapter.path) or engine.adapter.path}")
        else:
            print(f"deltamem-edge chat · model: {f'{resolved.name} ({model})' if resolved.name else model}")
            if engine.adapter:
                print(f"  adapter: {engine.adapter.path}{' (bundled)' if engine.adapter.bundled else ''}")
        if conv.memory_path:
            state = "new" if conv.turns == 0 else f"{count(conv.turns, 'turn')}, {count(conv.tokens_written, 'token')} written"
            ro = ", read-only" if readonly else ""
            print(f"  memory: {conv.memory_path} ({state}{ro}; adapter {short(conv._adapter_fp)})")
        else:
            print("  memory: none (this conversation is forgotten when you quit)")
        if recall_turns:
            n = conv.recall(recall_turns, progress=_progress)
            print(f"  recalled {count(n, 'turn')} into the context (read-only)")
        print("type /help for commands")
        _loop(conv)
    finally:
        conv.close()
        engine.close()


def _ask(prompt: str) -> bool:
    try:
        return input(prompt).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _loop(conv) -> None:  # noqa: ANN001
    interactive = sys.stdin.isatty()
    if interactive:
        _setup_readline()
    last_interrupt = False
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            if last_interrupt:
                print()
                break
            print("\n(Ctrl-C again or /quit to leave)")
            last_interrupt = True
            continue
        last_interrupt = False
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(conv, text):
                break
            continue
        pieces = conv.say(text, stream=True, progress=_progress)
        try:
            for piece in pieces:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            pieces.close()
            print(" [stopped]", end="")
        print()
    saved = conv.save()
    if saved:
        print(f"memory saved: {saved} ({count(conv.turns, 'turn')}, {count(conv.tokens_written, 'token')} written)")


def _command(conv, text: str) -> bool:  # noqa: ANN001
    """Run a slash command; False means quit."""
    cmd, _, arg = text.partition(" ")
    cmd = cmd.lower()
    if cmd in ("/quit", "/exit", "/q"):
        return False
    if cmd == "/help":
        print(HELP)
    elif cmd == "/save":
        saved = conv.save()
        print(f"saved {saved}" if saved else "nothing to save (no memory file, or read-only)")
    elif cmd == "/stats":
        _stats(conv)
    elif cmd == "/recall":
        try:
            n = int(arg or "1")
        except ValueError:
            print("usage: /recall N")
            return True
        print(f"recalled {count(conv.recall(n, progress=_progress), 'turn')} (read-only)")
    elif cmd == "/reset":
        if _ask("erase this conversation's memory for good? [y/N] "):
            conv.reset_memory()
            print("memory erased")
        else:
            print("kept")
    else:
        print(f"unknown command {cmd}; /help lists them")
    return True


def _stats(conv) -> None:  # noqa: ANN001
    eng = conv.engine
    print(f"turns: {conv.turns}   tokens written: {conv.tokens_written}   "
          f"context: {conv.session.n_past}/{eng.n_ctx}   seed: {conv.sampler_seed}")
    st = conv.stats
    if st.prefill_s or st.decode_s:
        pre = st.prompt_tokens / st.prefill_s if st.prefill_s else 0.0
        dec = st.generated_tokens / st.decode_s if st.decode_s else 0.0
        print(f"last turn: {st.prompt_tokens} prompt tokens at {pre:.1f} tok/s, "
              f"{st.generated_tokens} generated at {dec:.1f} tok/s")
    if eng.adapter is None:
        return
    norms = conv.layer_norms()
    bars = " ▁▂▃▄▅▆▇█"
    top = float(norms.max()) or 1.0
    spark = "".join(bars[min(8, int(round(8 * n / top)))] for n in norms)
    print(f"state norms per layer (max {top:.3f}): {spark}")
