"""MCP server over stdio: `remember`, `recall` and `forget` for one namespace, over `ipm.IPM`.

    ipm mcp --home ~/.ipm --user alice

An MCP client (an assistant) starts this as a subprocess and talks JSON-RPC over its
stdin/stdout, so nothing else may be printed to stdout. Every tool call is one `IPM` method
call, run in a worker thread so the protocol loop keeps answering.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import anyio.to_thread

from .autotrain import AutoTrain
from .engine import DEFAULT_USER, IPM
from .errors import IPMError, environment_error_message
from .store import check_namespace

try:  # mcp >= 2
    from mcp.server.mcpserver import MCPServer as _Server
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as _Server
    from mcp.server.fastmcp.exceptions import ToolError

log = logging.getLogger("ipm.mcp")

INSTRUCTIONS = (
    "Long-term memory for one user. `remember` stores a fact verbatim; `recall` answers a question with "
    "the stored texts that answer it (or none: `abstained`); `forget` erases a memory for good. Memories "
    "added since the last training are found by their words and marked `pending`."
)


RECALL_K = 3  # hits a recall returns when the assistant does not say: a few, for it to choose from


def create_mcp(mem: IPM, user: str = DEFAULT_USER):
    """An MCP server whose tools act on namespace `user` of `mem`."""
    check_namespace(user)
    server = _Server("ipm", instructions=INSTRUCTIONS, log_level="WARNING")

    # One tool call at a time, in the order they came: a client that sends `remember` then
    # `forget` without waiting for the first reply must not have them race (the SDK runs each
    # request as its own task). anyio's lock lets its waiters in first come, first served.
    one_at_a_time = anyio.Lock()

    async def call(fn, *args, **kwargs):
        async with one_at_a_time:
            try:
                return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
            except IPMError as e:
                raise ToolError(str(e)) from None
            except Exception as e:  # the client gets a reason; the traceback goes to stderr
                said = environment_error_message(e)
                if said is None:
                    log.exception("tool call failed")
                raise ToolError(said or f"internal error: {type(e).__name__}: {e}") from None

    @server.tool()
    async def remember(text: str, id: Optional[str] = None) -> dict[str, Any]:
        """Store a memory verbatim. `id` is an optional semantic ID like `personal_pet_max`
        (domain_topic_entity), minted from the text when omitted. Returns the stored memory."""
        m = await call(mem.add, text, id=id, user=user)
        return m.to_dict()

    @server.tool()
    async def recall(question: str, k: Optional[int] = None) -> dict[str, Any]:
        """Recall up to `k` stored memories that answer `question` (default 3, or the server's
        max_k if lower). Returns `{question, abstained, hits: [{id, text, score, pending?}]}`;
        the texts are exactly as stored."""
        if k is None:
            k = min(RECALL_K, mem.config.max_k)
        a = await call(mem.ask, question, k=k, user=user)
        return a.to_dict()

    @server.tool()
    async def forget(id: str) -> dict[str, Any]:
        """Erase the memory with this ID, its history and its questions; it is never recalled again."""
        await call(mem.forget, id, user=user)
        return {"forgotten": id}

    return server


def run(mem: IPM, user: str = DEFAULT_USER, train_after: float = 0) -> None:
    """Serve MCP over stdin/stdout until the client closes the connection. With `train_after`
    (seconds), the namespace is trained in the background once its memories have not changed
    for that long (autotrain.py)."""
    auto = AutoTrain(mem, train_after, lambda ns: mem.train(user=ns), namespaces=[user]).start() if train_after else None
    try:
        create_mcp(mem, user).run("stdio")
    finally:
        if auto is not None and auto.stop():
            # The training thread is inside the model; ending the interpreter under it can abort
            # the process. Nothing is lost: a version becomes current only once complete.
            log.warning("stopped while training namespace %s; the previous index version stays current", user)
            logging.shutdown()
            os._exit(0)


if __name__ == "__main__":  # python -m ipm.mcp_server --home DIR --user NAME
    from .cli_server import mcp as _mcp_command
    from .cli_server import run_alone

    run_alone(_mcp_command)
