"""The `vitcompress` command line. Commands are thin: parse, call the library, render.

Heavy libraries (torch, timm, onnxruntime) are imported inside the commands so `--help` is instant.
Exit codes: 0 ok, 1 internal error (rerun with --debug), 2 bad input, 3 budget/latency gate failed,
4 verification failed (export parity).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from vitcompress._version import __version__
from vitcompress.cli.common import err_console
from vitcompress.errors import EXIT_BAD_INPUT, VitcompressError


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
        except BrokenPipeError:  # the reader of our output went away (`... | head`): Click handles it
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as err:
            storage = _storage_error(err, ctx)
            if storage is not None:
                _show(ctx, err, f"error: {storage[0]}", storage[1])
                raise typer.Exit(EXIT_BAD_INPUT) from None
            _show(
                ctx,
                err,
                f"internal error: {type(err).__name__}: {err}",
                "rerun with --debug for the traceback",
            )
            raise typer.Exit(1) from None


# errno -> what went wrong, for the OS errors that mean "this place cannot be written", not a bug.
_STORAGE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# A path that runs through an existing file, or names a folder where a file is meant.
_PATH_ERRNOS = {
    errno.ENOTDIR: "not a directory",
    errno.EEXIST: "exists already",
    errno.EISDIR: "is a directory",
}
_PATH_LOCALS = ("filename", "path", "file", "fname", "out", "target", "dest")


def _errno_in_text(text: str) -> int | None:
    """The errno of an OS error that a library (safetensors' Rust writer) turned into text."""
    for code in _STORAGE_ERRNOS:
        if f"os error {code})" in text or f"code: {code}," in text or os.strerror(code) in text:
            return code
    return None


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo and len(seen) < 16:
        item = todo.pop(0)
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        todo += [item.__cause__, item.__context__]
    return seen


def _path_in_traceback(err: BaseException) -> str | None:
    """The file a failed write was writing: a path-like local of the innermost frame that has one."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, str | os.PathLike) and str(value):
                return str(value)
    return None


# Staging names of the atomic writers: `.tmp-NAME-xxxx` and `.NAME.xxxx.tmp` stand for NAME, a bare
# `.tmp-xxxx` folder for its parent.
_STAGED = re.compile(r"\.tmp-(?P<tree>.+)-[0-9a-f]{8}|\.tmp-[a-z0-9_]{8}|\.(?P<file>.+)\.[a-z0-9_]{8}\.tmp")


def _final_path(path: str) -> str:
    """The path a user asked for, not the staging name an atomic write was filling."""
    parts = []
    for part in Path(path).parts:
        staged = _STAGED.fullmatch(part)
        if staged is None:
            parts.append(part)
        elif staged.group("tree") or staged.group("file"):
            parts.append(staged.group("tree") or staged.group("file"))
    return str(Path(*parts)) if parts else path


def _out_option(ctx: typer.Context) -> str | None:
    args = [*getattr(ctx, "_protected_args", []), *ctx.args]
    for i, arg in enumerate(args):
        if arg in ("--out", "-o") and i + 1 < len(args):
            return str(args[i + 1])
        if arg.startswith("--out="):
            return arg[len("--out=") :]
    return None


def _storage_error(err: BaseException, ctx: typer.Context) -> tuple[str, str] | None:
    """A message and hint when `err` (or what caused it) is a full, read-only or unwritable disk,
    or a path through an existing file: the user's to fix, so exit 2, not an internal error."""
    for item in _chain(err):
        code: int | None = None
        path: str | None = None
        if isinstance(item, OSError) and item.errno in {*_STORAGE_ERRNOS, *_PATH_ERRNOS}:
            code = item.errno
            path = item.filename if item.filename is not None else None
            path = str(path) if path is not None else None
        elif isinstance(item, OSError) or "safetensor" in type(item).__name__.lower():
            code = _errno_in_text(str(item))
        if code is None:
            continue
        path = path or _path_in_traceback(item) or _out_option(ctx)
        if path:
            path = _final_path(path)
        where = f" while writing {path}" if path else ""
        if code in _PATH_ERRNOS:
            if code != errno.EISDIR and path and os.path.isfile(path):
                what = f"{path} is an existing file, not a directory: nothing can be written under it"
            else:
                what = f"{path or 'a path'}: {_PATH_ERRNOS[code]} ({os.strerror(code)})"
            return (
                what,
                "the path runs through an existing file or names a folder where a file goes; "
                "choose another --out (or fix the path given)",
            )
        if code in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"{_STORAGE_ERRNOS[code]}{where}: {os.strerror(code)}",
                "free space or choose another --out",
            )
        if code == errno.EROFS:
            return (f"not writable{where}: {os.strerror(code)}", "choose another --out")
        return (
            f"{_STORAGE_ERRNOS[code]} on {path or 'a file'}: not writable (or not readable) by this user",
            "choose another --out, or fix the permissions of that path",
        )
    return None


def _show(ctx: typer.Context, err: BaseException, message: str, hint: str | None) -> None:
    debug = bool((ctx.obj or {}).get("debug")) or os.environ.get("VITCOMPRESS_DEBUG") == "1"
    if debug:
        err_console.print_exception(show_locals=False)
    for line in message.splitlines():
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    if hint:
        err_console.print(f"hint: {hint}", markup=False, highlight=False, soft_wrap=True, style="dim")


def _escape_markup(command: Any) -> None:
    """Make help text literal for Typer's rich help: `[heads, mlp]` in an example would otherwise
    be read as a rich markup tag and vanish. Walks the command, its parameters and subcommands."""
    from rich.markup import escape

    if getattr(command, "_vitcompress_escaped", False):
        return
    command._vitcompress_escaped = True
    for attr in ("help", "short_help", "epilog"):
        text = getattr(command, attr, None)
        if isinstance(text, str):
            setattr(command, attr, escape(text))
    for param in getattr(command, "params", []):
        if isinstance(getattr(param, "help", None), str):
            param.help = escape(param.help)
    for sub in (getattr(command, "commands", None) or {}).values():
        _escape_markup(sub)


class _App(_ErrorFunnel):
    """The root group: the error funnel, and help text that rich prints as written (no markup)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _escape_markup(self)


app = typer.Typer(
    cls=_App,
    name="vitcompress",
    help="Compress vision transformers (ViT/DeiT) for a deployment target and prove it there: "
    "prune, factorize, distill, quantize; export ONNX; gate on measured latency.",
    epilog="Exit codes: 0 ok, 1 internal error, 2 bad input, 3 budget or latency gate failed, "
    "4 export parity failed.",
    no_args_is_help=True,
    add_completion=True,
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
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="More detail on stderr: debug messages, and what the libraries underneath say (ONNX "
            "Runtime's INFO messages, Python warnings, transformers' loading bars).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    if verbose and quiet:
        raise typer.BadParameter("give one of --verbose and --quiet, not both", param_hint="'-v' / '-q'")
    ctx.obj = {"debug": debug}
    configure_output(verbose=verbose, quiet=quiet)


# Libraries whose own log records are noise at the default verbosity, even their warnings.
_NOISY_LOGGERS = ("torch", "timm", "onnxscript", "transformers", "onnx_ir", "httpx")
# Environment switches read when a library is first imported: progress bars and log levels.
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
_env_set: set[str] = set()


class _OwnOrImportant(logging.Filter):
    """What reaches the console: vitcompress's own records at the chosen level; another library's
    (ONNX Runtime's quantizer logs every tensor at INFO, through the root logger) from WARNING on,
    or from INFO on with --verbose; Python warnings (`py.warnings`) only with --verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "vitcompress" or record.name.startswith("vitcompress."):
            return True
        if record.name == "py.warnings":
            return self.verbose
        return record.levelno >= (logging.INFO if self.verbose else logging.WARNING)


def configure_output(verbose: bool = False, quiet: bool = False) -> None:
    """One clean console: log records through one rich handler on stderr, third-party INFO, Python
    warnings and progress bars (transformers' "Loading weights") hidden unless `verbose`."""
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    handler.addFilter(_OwnOrImportant(verbose))
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    logging.captureWarnings(False)  # re-arm: whoever replaced warnings.showwarning since (a test)
    logging.captureWarnings(True)
    for name in _NOISY_LOGGERS:  # their INFO is internals (torch's compile statistics): warnings at most
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
    for key, value in _QUIET_ENV.items():
        if verbose and key in _env_set:
            os.environ.pop(key, None)
            _env_set.discard(key)
        elif not verbose and key not in os.environ:
            os.environ[key] = value
            _env_set.add(key)
    # Libraries imported already (a test process, `python -m` in one interpreter) read no environment
    # again: switch them directly. Nothing is imported here: --help stays fast.
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        (hub.enable_progress_bars if verbose else hub.disable_progress_bars)()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        (hf_logging.enable_progress_bar if verbose else hf_logging.disable_progress_bar)()
        hf_logging.set_verbosity(logging.INFO if verbose else logging.ERROR)


def _register() -> None:
    from vitcompress.cli import (
        bench_cmd,
        compress_cmd,
        convert_cmd,
        distill_cmd,
        eval_cmd,
        export_cmd,
        factorize_cmd,
        inspect_cmd,
        intcheck_cmd,
        prune_cmd,
        quantize_cmd,
        recipe_cmd,
        sparsify_cmd,
        sweep_cmd,
        target_cmd,
        tokens_cmd,
        tune_cmd,
    )

    app.command("compress")(compress_cmd.compress)
    app.command("inspect")(inspect_cmd.inspect)
    app.command("prune")(prune_cmd.prune)
    app.command("factorize")(factorize_cmd.factorize)
    app.command("sparsify")(sparsify_cmd.sparsify)
    app.command("tokens")(tokens_cmd.tokens)
    app.command("export")(export_cmd.export)
    app.command("eval")(eval_cmd.evaluate)
    app.command("distill")(distill_cmd.distill)
    app.command("quantize")(quantize_cmd.quantize)
    app.command("bench")(bench_cmd.bench)
    app.command("integer-check")(intcheck_cmd.integer_check)
    app.command("sweep")(sweep_cmd.sweep)
    app.command("convert")(convert_cmd.convert)
    app.add_typer(recipe_cmd.app, name="recipe")
    app.add_typer(target_cmd.app, name="target")
    app.command("tune")(tune_cmd.tune)


_register()


def main() -> None:
    try:
        app(prog_name="vitcompress")
    except BrokenPipeError:
        # the reader went away (`vitcompress --help | head`): not an error of ours; point stdout at
        # /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    sys.exit(0)
