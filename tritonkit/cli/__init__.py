"""The `tritonkit` command: a thin layer over the library API, one module per command group
(building, serving, requests, operations, measuring); each registers its commands on `app`."""

from __future__ import annotations

import os
import sys

import typer

from tritonkit.cli.common import app, console, labelled
from tritonkit.errors import TritonkitError

# isort: off
# imported in the order `tritonkit --help` lists them: make, serve, ask, check and deploy, measure
from tritonkit.cli import building, serving, requests, operations, measuring

# isort: on

COMMAND_GROUPS = (building, serving, requests, operations, measuring)


def main() -> None:
    try:
        code = app(standalone_mode=False)  # click returns a command's typer.Exit code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except TritonkitError as exc:
        if os.environ.get("TRITONKIT_DEBUG") == "1":
            raise
        labelled("error:", "red", str(exc))
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
