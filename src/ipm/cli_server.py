"""`ipm serve` and `ipm mcp`: the HTTP and MCP servers (optional extra `ipm[server]`).

Registered in cli.py with `app.command()(serve)` and `app.command()(mcp)`. The server packages
are imported only when a command runs, so the rest of the CLI works without them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import InvalidInput

_Home = typer.Option(None, "--home", help="Home directory (default: $IPM_HOME or ./.ipm).", show_default=False)
_TrainAfter = typer.Option(0.0, "--train-after", min=0, metavar="SECONDS",
                           help="Train a namespace in the background once its memories have not changed for "
                                "this long (0 = never; run `ipm train` yourself).")


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InvalidInput(f"the {module!r} package is not installed: install ipm's server extra "
                           "(from a checkout: pip install -e '.[server]')")


def _log_to_stderr() -> None:
    """ipm's own log lines (an automatic training starting, a job failing) on stderr, in
    uvicorn's format; stdout stays the MCP protocol's."""
    logger = logging.getLogger("ipm")
    if logger.handlers:  # already set up in this process
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _open(home: Optional[Path]):
    from . import engine

    return engine.open(home)


def serve(host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
          port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
          home: Optional[Path] = _Home,
          keys: Optional[Path] = typer.Option(None, "--keys", show_default=False,
                                              help="JSON file {\"api-key\": \"namespace\", ...}; "
                                                   "default: the same JSON in $IPM_API_KEYS."),
          train_after: float = _TrainAfter):
    """Run the HTTP API (one namespace per API key)."""
    for module in ("fastapi", "uvicorn"):
        _need(module)
    from . import server

    api_keys = server.load_keys(keys)  # refuses to start without keys
    _log_to_stderr()
    server.serve(_open(home), api_keys, host=host, port=port, train_after=train_after)


def mcp(home: Optional[Path] = _Home,
        user: str = typer.Option("default", "--user", "-u", help="The namespace the tools act on."),
        train_after: float = _TrainAfter):
    """Run an MCP server over stdio with tools remember, recall and forget."""
    _need("mcp")
    from . import mcp_server
    from .store import check_namespace

    check_namespace(user)
    _log_to_stderr()
    mcp_server.run(_open(home), user, train_after=train_after)


def run_alone(command) -> None:
    """Run one of these commands as a program (`python -m ipm.server`, `python -m ipm.mcp_server`),
    with the CLI's error handling: an IPMError is one line on stderr and exit code 1."""
    from .cli import run

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    run(app)
