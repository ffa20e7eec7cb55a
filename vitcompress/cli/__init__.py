"""The `vitcompress` command line. Commands are thin: parse, call the library, render.

Heavy libraries (torch, timm, onnxruntime) are imported inside the commands so `--help` is instant.
Exit codes: 0 ok, 1 internal error (rerun with --debug), 2 bad input, 3 budget/latency gate failed,
4 verification failed (export parity).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from vitcompress import __version__
from vitcompress.cli.common import err_console
from vitcompress.errors import VitcompressError


class _ErrorFunnel(TyperGroup):
    """Turns every error into one line on stderr and a meaningful exit code; --debug adds the traceback."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # Typer's own usage errors and exits
            raise
        except VitcompressError as err:
            _show(ctx, err, f"error: {err.message}", err.hint)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as err:
            _show(
                ctx,
                err,
                f"internal error: {type(err).__name__}: {err}",
                "rerun with --debug for the traceback",
            )
            raise typer.Exit(1) from None


def _show(ctx: typer.Context, err: BaseException, message: str, hint: str | None) -> None:
    debug = bool((ctx.obj or {}).get("debug")) or os.environ.get("VITCOMPRESS_DEBUG") == "1"
    if debug:
        err_console.print_exception(show_locals=False)
    for line in message.splitlines():
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    if hint:
        err_console.print(f"hint: {hint}", markup=False, highlight=False, soft_wrap=True, style="dim")


app = typer.Typer(
    cls=_ErrorFunnel,
    name="vitcompress",
    help="Compress vision transformers (ViT/DeiT) for a deployment target and prove it there: "
    "prune, factorize, distill, quantize; export ONNX; gate on measured latency.",
    epilog="Exit codes: 0 ok, 1 internal error, 2 bad input, 3 budget or latency gate failed, "
    "4 export parity failed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitcompress {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of any error.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    from rich.logging import RichHandler

    ctx.obj = {"debug": debug}
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_time=False, show_path=False, markup=False)],
        force=True,
    )
    for noisy in ("torch", "timm", "onnxscript", "transformers", "onnx_ir", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _register() -> None:
    from vitcompress.cli import (
        bench_cmd,
        compress_cmd,
        distill_cmd,
        eval_cmd,
        export_cmd,
        factorize_cmd,
        inspect_cmd,
        prune_cmd,
        quantize_cmd,
        recipe_cmd,
        sweep_cmd,
    )

    app.command("compress")(compress_cmd.compress)
    app.command("inspect")(inspect_cmd.inspect)
    app.command("prune")(prune_cmd.prune)
    app.command("factorize")(factorize_cmd.factorize)
    app.command("export")(export_cmd.export)
    app.command("eval")(eval_cmd.evaluate)
    app.command("distill")(distill_cmd.distill)
    app.command("quantize")(quantize_cmd.quantize)
    app.command("bench")(bench_cmd.bench)
    app.command("sweep")(sweep_cmd.sweep)
    app.add_typer(recipe_cmd.app, name="recipe")


_register()


def main() -> None:
    app(prog_name="vitcompress")
    sys.exit(0)
