"""The MCP server as an assistant runs it: a subprocess over stdio, driven by the official SDK
client. The subprocess reads the tiny test model from the home's ipm.toml."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("mcp")
anyio = pytest.importorskip("anyio")

import ipm  # noqa: E402
from tests.conftest import MEMORIES  # noqa: E402


@pytest.fixture
def mcp_home(tiny_model, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    options = {"base_model": str(tiny_model), "epochs": 10, "lora_layers": 2, "lora_r": 8, "batch_size": 16,
               "learning_rate": 5e-3, "questions_per_memory": 8, "beam_size": 4, "abstain_threshold": 0.0}
    toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    (home / "ipm.toml").write_text(toml + "\n")
    return home


def _result(r) -> tuple[bool, object]:
    """(is_error, payload) of a CallToolResult, for mcp 1.x and 2.x alike."""
    is_error = getattr(r, "is_error", None)
    if is_error is None:
        is_error = getattr(r, "isError", False)
    text = "".join(getattr(c, "text", "") for c in r.content)
    if is_error:
        return True, text
    return False, json.loads(text)


def test_mcp_tools_over_stdio(mcp_home, tmp_path):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    cache = tmp_path / "cache"
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "ipm.mcp_server", "--home", str(mcp_home), "--user", "alice"],
        env={"IPM_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    errlog = (tmp_path / "mcp-stderr.log").open("w")
    stored: dict[str, str] = {}

    async def main():
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = {t.name: t for t in (await session.list_tools()).tools}
                assert set(tools) == {"remember", "recall", "forget"}
                schema = lambda t: getattr(t, "input_schema", None) or t.inputSchema  # noqa: E731
                assert schema(tools["remember"])["required"] == ["text"]
                assert schema(tools["recall"])["properties"]["k"]["default"] is None  # 3, or max_k if lower
                assert schema(tools["forget"])["required"] == ["id"]

                async def call(name, **args):
                    return _result(await session.call_tool(name, args))

                # remember: stored verbatim, with a given or minted ID
                for mid, text in MEMORIES.items():
                    err, m = await call("remember", text=text, id=mid)
                    assert not err and m["id"] == mid and m["text"] == text and m["namespace"] == "alice", m
                    stored[mid] = text
                text = "I play the piano every evening.\n"
                err, m = await call("remember", text=text)
                assert not err and m["text"] == text and m["id"]
                stored[m["id"]] = text
                err, msg = await call("remember", text="x", id="Not An ID")
                assert err and "malformed" in msg
                err, msg = await call("remember", text="again", id="personal_pet_max")
                assert err and "already taken" in msg

                # recall before any training: new memories are matched by their words (pending)
                err, a = await call("recall", question="my dog Max is a beagle")
                assert not err and set(a) == {"question", "abstained", "hits"}
                assert a["hits"][0] == {"id": "personal_pet_max", "text": MEMORIES["personal_pet_max"],
                                        "score": a["hits"][0]["score"], "pending": True}
                err, msg = await call("recall", question="anything", k=0)
                assert err and "k must be" in msg
                err, msg = await call("recall", question="   ")
                assert err and "empty" in msg

                # train (in this process, on the same home): the server's recall moves to the index
                trained = ipm.open(mcp_home, cache=cache)
                await anyio.to_thread.run_sync(lambda: trained.train(user="alice"))
                for text in stored.values():
                    err, a = await call("recall", question=text, k=2)
                    assert not err and a["hits"] and not a["abstained"], a
                    for h in a["hits"]:
                        assert h["text"] == stored[h["id"]] and "pending" not in h

                # forget: gone at once, and only once
                err, r = await call("forget", id="personal_pet_max")
                assert not err and r == {"forgotten": "personal_pet_max"}
                for q in (MEMORIES["personal_pet_max"], "my dog Max is a beagle"):
                    err, a = await call("recall", question=q, k=5)
                    assert not err and "personal_pet_max" not in [h["id"] for h in a["hits"]]
                err, msg = await call("forget", id="personal_pet_max")
                assert err and "no memory" in msg

    try:
        anyio.run(main)
    finally:
        errlog.close()

    # The tools acted on the --user namespace only.
    mem = ipm.open(mcp_home, cache=cache)
    assert set(mem.store.ids("alice")) == set(stored) - {"personal_pet_max"}
    assert mem.store.namespaces() == ["alice"]
    assert "Traceback" not in (tmp_path / "mcp-stderr.log").read_text()


def test_mcp_refuses_a_bad_namespace(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "ipm.mcp_server", "--home", str(tmp_path / "h"), "--user", "bad name!"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "namespace" in (r.stdout + r.stderr)


def test_mcp_with_train_after_indexes_what_it_remembers_by_itself(mcp_home, tmp_path):
    """`ipm mcp --train-after S`: memories remembered over MCP move from `pending` (found by
    their words) into the trained index with no `ipm train` run by anyone."""
    import time

    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    cache = tmp_path / "cache"
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "ipm.mcp_server", "--home", str(mcp_home), "--user", "alice",
                                      "--train-after", "1"],
        env={"IPM_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    errlog = (tmp_path / "mcp-stderr.log").open("w")

    async def main():
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                for mid, text in MEMORIES.items():
                    assert not _result(await session.call_tool("remember", {"text": text, "id": mid}))[0]
                err, a = _result(await session.call_tool("recall", {"question": MEMORIES["personal_pet_max"]}))
                assert not err and a["hits"][0].get("pending"), a  # not trained yet
                deadline = time.monotonic() + 300
                while ipm.open(mcp_home, cache=cache).untrained("alice"):
                    assert time.monotonic() < deadline, "the MCP server did not train by itself"
                    await anyio.sleep(0.5)
                for mid, text in MEMORIES.items():
                    err, a = _result(await session.call_tool("recall", {"question": text, "k": 4}))
                    assert not err and mid in [h["id"] for h in a["hits"]], a
                    assert not any(h.get("pending") for h in a["hits"]), a

    try:
        anyio.run(main)
    finally:
        errlog.close()
    assert "Traceback" not in (tmp_path / "mcp-stderr.log").read_text()


def test_mcp_runs_tool_calls_one_at_a_time_in_order_and_says_why_one_failed():
    """A client may send `remember` then `forget` without waiting for the first reply: the SDK
    runs each request as its own task, and the forget must not overtake the add. An error
    that is not ipm's own still comes back with its reason."""
    import threading
    import time

    from ipm.mcp_server import create_mcp
    from ipm.store import Memory

    class SlowMemory:  # the IPM methods the tools call, with an add that takes its time
        def __init__(self):
            self.calls, self.running, self.overlapped = [], 0, False
            self.lock = threading.Lock()

        def _run(self, name, seconds):
            with self.lock:
                self.running += 1
                self.overlapped |= self.running > 1
            time.sleep(seconds)
            with self.lock:
                self.running -= 1
                self.calls.append(name)

        def add(self, text, id=None, user=None):
            self._run("add", 0.3)
            return Memory(id=id, text=text, namespace=user, sha256="", version=1, created_at="", updated_at="")

        def forget(self, id, user=None):
            self._run("forget", 0)

        config = ipm.Config(max_k=2)

        def ask(self, question, k=3, user=None):
            self.asked_k = k
            raise RuntimeError("the model fell over")

    mem = SlowMemory()
    server = create_mcp(mem, "alice")

    async def main():
        outcomes: dict = {}

        async def tool(name, args):
            try:
                outcomes[name] = await server.call_tool(name, args)
            except Exception as e:  # mcp 1.x raises a tool's error, 2.x returns it as a result
                outcomes[name] = e

        async with anyio.create_task_group() as tg:
            tg.start_soon(tool, "remember", {"text": "My dog's name is Max.", "id": "personal_pet_max"})
            await anyio.sleep(0.01)
            tg.start_soon(tool, "forget", {"id": "personal_pet_max"})
            await anyio.sleep(0.01)
            tg.start_soon(tool, "recall", {"question": "dog?"})
        return outcomes

    outcomes = anyio.run(main)
    assert mem.calls == ["add", "forget"] and not mem.overlapped
    failed = outcomes["recall"]
    said = str(failed) if isinstance(failed, Exception) else "".join(getattr(c, "text", "") for c in failed.content)
    assert "RuntimeError: the model fell over" in said, failed
    assert mem.asked_k == 2  # recall's default k (3) within the server's max_k
