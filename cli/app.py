"""The ``dmlkd`` command group and what every command shares: one-line errors, ``--debug``, ``--set``.

Errors caused by user input (``DmlkdError``) are printed as one line on stderr with exit code 2; ``--debug``
shows the traceback instead. The commands register themselves on ``main`` (``@main.command``) in the modules
of this package; ``dmlkd.cli`` imports them all.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import click

from dmlkd.errors import DmlkdError, Interrupted
from dmlkd.version import __version__


class _Group(click.Group):
    """A group that turns user errors into one readable line instead of a traceback."""

    def main(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        # ``--debug`` is accepted anywhere on the command line (``dmlkd teacher train ... --debug``): it is
        # moved in front of the subcommand, where the group's option is parsed.
        args = list(sys.argv[1:] if args is None else args)
        cut = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:cut]:
            args = ["--debug", *(a for i, a in enumerate(args) if not (a == "--debug" and i < cut))]
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DmlkdError as error:
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)
        except click.exceptions.NoArgsIsHelpError:
            raise  # a group called without a command: click prints its help
        except click.UsageError as error:  # a bad option value, a missing option, an unknown command
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {_usage_line(error)}", err=True)
            ctx.exit(error.exit_code)
        except Interrupted as stop:
            where = f" in {stop.where}/state" if stop.where else ""
            click.echo(
                f"stopped at step {stop.step}; resumable state saved{where} "
                "(rerun the same command with --resume to continue; pipelines resume by themselves)",
                err=True,
            )
            ctx.exit(128 + stop.signum)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except OSError as error:  # the machine, not the code: a full disk, a read-only or forbidden folder
            if error.errno not in _ENVIRONMENT_ERRNOS or (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {_os_error_line(error)}", err=True)
            ctx.exit(2)
        except Exception as error:  # safetensors' own error type wraps OS errors (a full disk) and bad files
            line = _safetensors_line(error)
            if line is None or (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {line}", err=True)
            ctx.exit(2)


# OS errors that a user fixes on the machine (space, permissions, limits); any other OSError is a bug and
# keeps its traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE}


def _os_error_line(error: OSError) -> str:
    """``no space left on device: '/runs/x/state' (free some space and rerun; ...)`` on one line."""
    reason = (error.strerror or os.strerror(error.errno or 0)).lower()
    where = f": {str(error.filename)!r}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space and rerun; checkpoints already written are intact and training resumes with --resume"
    elif error.errno in (errno.EMFILE, errno.ENFILE):
        hint = "raise the open-file limit (ulimit -n) or lower data.num_workers"
    else:
        hint = "choose a folder you can write to (--out) or fix its permissions"
    return f"{reason}{where} ({hint})"


def _safetensors_line(error: BaseException) -> str | None:
    """One line for a ``SafetensorError`` (an OS error it wraps is reported like one), else None."""
    if type(error).__name__ != "SafetensorError" or not type(error).__module__.startswith("safetensors"):
        return None
    text = " ".join(str(error).split())
    code = re.search(r"\(os error (\d+)\)", text)
    if code and int(code.group(1)) in _ENVIRONMENT_ERRNOS:
        number = int(code.group(1))
        path = re.search(r'at path "([^"]+)"', text)
        return _os_error_line(OSError(number, os.strerror(number), path.group(1) if path else None))
    return f"a safetensors file could not be read or written: {text} (re-create the file, or rerun with --debug)"


def _usage_line(error: click.UsageError) -> str:
    """Click's message on one line, the valid commands for an unknown one, and where the help is."""
    text = error.format_message()
    if error.ctx is None:
        return text
    if isinstance(error.ctx.command, click.Group) and text.startswith("No such command") and "?" not in text:
        text = f"{text.rstrip('.')}; commands: {', '.join(error.ctx.command.list_commands(error.ctx))}"
    return f"{text} (see '{error.ctx.command_path} --help')"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dmlkd")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """dmlkd: train a metric-learning teacher, then distil its embedding space into a compact student."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
