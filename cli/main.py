"""``deltamem-edge``: the typer application and its error policy.

Errors are one line in plain words plus a hint, exit code 1, and no Python
traceback unless ``--debug`` is given (or DELTAMEM_DEBUG=1).
"""

from __future__ import annotations

import os
import sys

import typer

from deltamem_edge.errors import DeltaMemError

app = typer.Typer(
    name="deltamem-edge",
    help="On-device δ-mem language models: chat with persistent memory, convert, inspect, verify, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
convert_app = typer.Typer(help="Convert upstream checkpoints to GGUF.", no_args_is_help=True)
memory_app = typer.Typer(help="Inspect, diff, export or reset memory state files.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")
app.add_typer(memory_app, name="memory")

_debug = os.environ.get("DELTAMEM_DEBUG", "") not in ("", "0")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks and llama.cpp logs.")) -> None:
    global _debug
    if debug:
        _debug = True
        os.environ["DELTAMEM_VERBOSE"] = "1"


def _register() -> None:
    """Attach each verb's module (imported here so that main.py stays the one index)."""
    from . import build_cmd, chat, eval_memory, memory, rpc_server, verify

    app.command("chat")(chat.chat)
    app.command("build")(build_cmd.build)
    app.command("verify")(verify.verify)
    app.command("eval-memory")(eval_memory.eval_memory)
    rpc_server.register(app, convert_app)
    memory.register(memory_app)
    for optional in ("convert", "inspect_cmd", "bench", "train_cmd", "serve", "hub_cmd"):
        try:
            module = __import__(f"{__package__}.{optional}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{optional}":
                raise
            continue
        module.register(app, convert_app)


_register()


def report(error: BaseException) -> None:
    """Print an error the way the CLI promises: one line, then a hint."""
    if isinstance(error, DeltaMemError):
        print(f"error: {error}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
    else:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        print("hint: rerun with --debug for the full traceback", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # usage errors: typer prints them with the usage line
        show = getattr(e, "show", None)
        if show:
            show()
        else:
            print(f"error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one place that turns failures into a line and an exit code
        if _debug:
            raise
        report(e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
