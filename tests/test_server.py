"""The HTTP server, live: uvicorn on a free loopback port in a background thread, spoken to
with httpx. Tiny model only. Covers keys and namespaces, CRUD, all-or-nothing import,
background training with recall during it, validation errors, and a schemathesis fuzz run
of the OpenAPI spec (no 5xx, responses conform to the spec)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import ipm  # noqa: E402
from ipm.errors import InvalidInput, NotFound  # noqa: E402
from ipm.server import MAX_BODY_BYTES, create_app, load_keys  # noqa: E402
from tests.conftest import MEMORIES  # noqa: E402

KEYS = {"key-alice": "alice", "key-bob": "bob", "key-carol": "carol", "key-fuzz": "fuzz",
        "key-empty": "empty", "key-bulk": "bulk", "key-alice-2": "alice", "key-copy": "copy"}


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("server")
    cfg = ipm.Config(base_model=str(tiny_model), epochs=10, lora_layers=2, lora_r=8, batch_size=16,
                     learning_rate=5e-3, questions_per_memory=8, beam_size=4, abstain_threshold=0.0)
    mem = ipm.open(root / "home", config=cfg, cache=root / "cache")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(mem, KEYS), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, mem=mem)
    server.should_exit = True
    thread.join(15)
    sock.close()


def client(live, key: str | None = None, header: str = "bearer") -> httpx.Client:
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
    return httpx.Client(base_url=live.url, headers=headers, timeout=60)


@pytest.fixture
def alice(live):
    with client(live, "key-alice") as c:
        yield c


@pytest.fixture
def bob(live):
    with client(live, "key-bob", header="x-api-key") as c:
        yield c


# -- keys ---------------------------------------------------------------------------------------

def test_health_needs_no_key(live):
    with client(live) as c:
        r = c.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "version": ipm.__version__}


@pytest.mark.parametrize("method,path", [
    ("GET", "/memories"), ("POST", "/memories"), ("GET", "/memories/personal_pet_max"),
    ("PUT", "/memories/personal_pet_max"), ("DELETE", "/memories/personal_pet_max"),
    ("GET", "/memories/personal_pet_max/history"), ("POST", "/import"), ("POST", "/ask"), ("POST", "/ask/batch"),
    ("POST", "/train"),
    ("GET", "/train/abc"), ("GET", "/status"), ("GET", "/log")])
def test_every_route_but_health_needs_a_known_key(live, method, path):
    body = {"text": "x", "question": "x", "questions": ["x"]} if method in ("POST", "PUT") else None
    for headers in [{}, {"Authorization": "Bearer nope"}, {"X-API-Key": "KEY-ALICE"}, {"Authorization": "key-alice"},
                    {"Authorization": "Basic a2V5LWFsaWNlOg=="}, {"X-API-Key": ""}]:
        with httpx.Client(base_url=live.url, headers=headers) as c:
            r = c.request(method, path, json=body)
        assert r.status_code == 401, (headers, r.text)
        assert "API key" in r.json()["detail"]


def test_bearer_and_x_api_key_both_work(live):
    for c in (client(live, "key-empty"), client(live, "key-empty", header="x-api-key")):
        with c:
            r = c.get("/status")
        assert r.status_code == 200 and r.json()["user"] == "empty"


def test_namespaces_are_isolated_even_with_identical_ids_and_texts(live, alice, bob):
    same = {"id": "personal_pet_rex", "text": "My dog Rex is a beagle."}
    assert alice.post("/memories", json=same).status_code == 201
    r = bob.post("/memories", json=same)
    assert r.status_code == 201 and r.json()["namespace"] == "bob"
    secret = alice.post("/memories", json={"id": "health_allergy_secret", "text": "Alice is allergic to kiwis."})
    assert secret.status_code == 201

    # Bob cannot read, change, forget or recall Alice's memory.
    for method in ("GET", "DELETE"):
        assert bob.request(method, "/memories/health_allergy_secret").status_code == 404
    assert bob.get("/memories/health_allergy_secret/history").status_code == 404
    assert bob.put("/memories/health_allergy_secret", json={"text": "hacked"}).status_code == 404
    assert "health_allergy_secret" not in [m["id"] for m in bob.get("/memories").json()]
    a = bob.post("/ask", json={"question": "Alice is allergic to kiwis.", "k": 5}).json()
    assert all(h["id"] != "health_allergy_secret" and "kiwi" not in h["text"] for h in a["hits"])
    # The namespace comes from the key only: a namespace in the request is refused or ignored.
    assert bob.post("/memories", json={"text": "x y z", "user": "alice"}).status_code == 422
    assert all(m["namespace"] == "bob" for m in bob.get("/memories", params={"user": "alice"}).json())
    assert all("health_allergy_secret" not in e["ids"] for e in bob.get("/log").json())

    # Forgetting the shared ID in Bob's namespace leaves Alice's copy.
    assert bob.delete("/memories/personal_pet_rex").json() == {"forgotten": "personal_pet_rex"}
    assert bob.get("/memories/personal_pet_rex").status_code == 404
    r = alice.get("/memories/personal_pet_rex")
    assert r.status_code == 200 and r.json()["text"] == same["text"] and r.json()["namespace"] == "alice"
    assert alice.get("/memories/health_allergy_secret").json()["text"] == "Alice is allergic to kiwis."
    hits = alice.post("/ask", json={"question": "My dog Rex is a beagle.", "k": 3}).json()["hits"]
    assert [h["id"] for h in hits][:1] == ["personal_pet_rex"]
    batch = alice.post("/ask/batch", json={"questions": ["My dog Rex is a beagle.", "Alice is allergic to kiwis."],
                                            "k": 3}).json()
    assert [a["question"] for a in batch] == ["My dog Rex is a beagle.", "Alice is allergic to kiwis."]
    assert batch[0]["hits"] == hits
    batch = bob.post("/ask/batch", json={"questions": ["Alice is allergic to kiwis."], "k": 5}).json()
    assert all(h["id"] != "health_allergy_secret" for h in batch[0]["hits"])
    # A second key of the same namespace sees the same memories.
    with client(live, "key-alice-2") as alice2:
        assert alice2.get("/memories/health_allergy_secret").status_code == 200


# -- memories -------------------------------------------------------------------------------------

def test_crud_history_and_forget(live):
    with client(live, "key-empty") as c:
        r = c.post("/memories", json={"text": "My sister Anna lives in Berlin.",
                                      "questions": ["where does anna live?"]})
        assert r.status_code == 201
        m = r.json()
        assert m["version"] == 1 and m["questions"] == ["where does anna live?"]
        mid = m["id"]
        assert c.get(f"/memories/{mid}").json()["text"] == "My sister Anna lives in Berlin."
        text2 = "My sister Anna moved to Hamburg.  \u00e9\U0001f600\n"  # kept byte-exact
        r = c.put(f"/memories/{mid}", json={"text": text2})
        assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["text"] == text2
        hist = c.get(f"/memories/{mid}/history").json()
        assert [v["version"] for v in hist] == [1, 2]
        assert [v["text"] for v in hist] == ["My sister Anna lives in Berlin.", text2]
        assert c.post("/memories", json={"id": mid, "text": "other"}).status_code == 409
        assert c.put("/memories/note_misc_nothing", json={"text": "x"}).status_code == 404
        assert mid in [x["id"] for x in c.get("/memories").json()]
        assert c.get("/status").json()["memories"] == 1
        r = c.delete(f"/memories/{mid}")
        assert r.status_code == 200 and r.json() == {"forgotten": mid}
        for path in (f"/memories/{mid}", f"/memories/{mid}/history"):
            assert c.get(path).status_code == 404
        assert c.delete(f"/memories/{mid}").status_code == 404
        a = c.post("/ask", json={"question": "Where does my sister Anna live?", "k": 3}).json()
        assert a["abstained"] and a["hits"] == []
        actions = [e["action"] for e in c.get("/log", params={"limit": 3}).json()]
        assert actions[-1] == "ask" and "forget" in actions
        assert c.get("/status").json() | {"training_job": None} == {
            "user": "empty", "memories": 0, "indexed": 0, "pending": 0, "changed": 0, "index_version": None,
            "base_model": None, "training_job": None}


def test_import_is_all_or_nothing(live):
    with client(live, "key-empty") as c:
        before = (c.get("/memories").json(), len(c.get("/log", params={"limit": 10000}).json()))
        bad = [{"id": "personal_pet_max", "text": "My dog is Max."}, {"id": "Not An ID", "text": "x"}]
        r = c.post("/import", json=bad)
        assert r.status_code == 422 and r.json()["detail"].startswith("request body: index 1: ")
        for body in ([{"text": "ok"}, {"question": "q?", "memory_id": "personal_pet_max"}],  # mixed
                     [{"text": "ok"}, {"text": "   "}], [{"text": "ok", "colour": "red"}], [], {},
                     [{"text": "ok"}, 7], [{"question": "who?", "memory_id": "personal_pet_nobody"}],
                     {"personal_pet_max": "fine", "BAD": "x"}, "just a string",
                     [{"id": "personal_pet_max", "text": "a"}, {"id": "personal_pet_max", "text": "b"}]):
            r = c.post("/import", json=body)
            assert r.status_code in (409, 422), (body, r.text)
            assert isinstance(r.json()["detail"], str) and "/tmp" not in r.json()["detail"]
        r = c.post("/import", content=b"[{\"text\": ", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.json()["detail"]
        # read as `ipm import` reads a file: a key given twice is refused, not the last kept
        for raw, says in ((b'{"personal_pet_max": "A", "personal_pet_max": "B"}', "given twice"),
                          (b'{"text": "one"}\n{"text": ""}\n', "line 2"), (b"\xff\xfe", "not UTF-8"),
                          (b'[{"text": ' + b"1" * 5000 + b"}]", "not valid JSON")):
            r = c.post("/import", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and says in r.json()["detail"], r.text
        assert (c.get("/memories").json(), len(c.get("/log", params={"limit": 10000}).json())) == before

        r = c.post("/import", json=[{"id": k, "text": v} for k, v in MEMORIES.items()])
        assert r.status_code == 201 and r.json() == {"memories": 4, "questions": 0, "ids": list(MEMORIES)}
        r = c.post("/import", json=[{"question": "what is my dog called?", "memory_id": "personal_pet_max"}])
        assert r.status_code == 201 and r.json()["questions"] == 1
        assert c.get("/memories/personal_pet_max").json()["questions"] == ["what is my dog called?"]
        for mid in MEMORIES:
            assert c.delete(f"/memories/{mid}").status_code == 200
        r = c.post("/import", content='\ufeff{"text": "My dog is Max."}\n{"text": "I live in Oslo."}\n'.encode())
        assert r.status_code == 201 and r.json()["memories"] == 2  # JSON lines, after a byte-order mark
        every = c.get("/memories").json()
        assert len(every) == 2 and c.get("/memories", params={"limit": 1, "offset": 1}).json() == every[1:]
        assert c.get("/memories", params={"limit": 0}).status_code == 422
        with client(live, "key-copy") as other:  # a listing imports as it is into another namespace
            copied = other.post("/import", json=every)
            assert copied.status_code == 201 and sorted(copied.json()["ids"]) == sorted(r.json()["ids"])
            assert sorted(m["text"] for m in other.get("/memories").json()) == sorted(m["text"] for m in every)
            for mid in copied.json()["ids"]:
                assert other.delete(f"/memories/{mid}").status_code == 200
        for mid in r.json()["ids"]:
            assert c.delete(f"/memories/{mid}").status_code == 200


def test_validation_errors_are_4xx_with_a_message(live, alice):
    import json

    cases = [
        ("POST", "/memories", {}), ("POST", "/memories", {"text": 5}), ("POST", "/memories", {"text": ""}),
        ("POST", "/memories", {"text": " \n "}), ("POST", "/memories", {"text": "x", "id": "Bad ID"}),
        ("POST", "/memories", {"text": "x", "questions": "not a list"}), ("POST", "/memories", b'{"text": "\\ud800"}'),
        ("POST", "/memories", {"text": "x" * 70000}), ("POST", "/memories", [1, 2]),
        ("PUT", "/memories/personal_pet_rex", {}), ("PUT", "/memories/personal_pet_rex", {"text": "  "}),
        ("POST", "/ask", {}), ("POST", "/ask", {"question": "q", "k": 0}),
        ("POST", "/ask", {"question": "q", "k": 101}),
        ("POST", "/ask", {"question": "q" * 1001}), ("POST", "/ask", {"question": "   "}),
        ("POST", "/ask", {"question": "q", "k": "many"}), ("GET", "/log?limit=0", None), ("GET", "/log?limit=x", None),
        ("POST", "/ask/batch", {"questions": []}), ("POST", "/ask/batch", {"questions": ["q", "  "]}),
        ("POST", "/ask/batch", {"questions": "q"}), ("POST", "/ask/batch", {"questions": ["q"] * 257}),
    ]
    before = alice.get("/memories").json()
    for method, path, body in cases:
        if isinstance(body, bytes):
            r = alice.request(method, path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = alice.request(method, path, json=body)
        assert r.status_code == 422, (method, path, body, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail, (path, body, detail)
    assert alice.get("/memories").json() == before
    r = alice.post("/memories", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert alice.get("/nowhere").status_code == 404
    assert alice.patch("/memories").status_code == 405
    # A key given twice is refused, as /import refuses it, not the last one kept.
    for path, raw, key in (
            ("/memories", b'{"text": "I own a kayak.", "id": "hobby_boat_kayak", "id": "hobby_boat_canoe"}', "id"),
            ("/ask", b'{"question": "my boat?", "k": 1, "k": 3}', "k")):
        r = alice.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == f"request body: key {key!r} is given twice in one object"
    r = alice.put("/memories/personal_pet_rex", content=b'{"text": "a", "text": "b"}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "given twice" in r.json()["detail"]
    assert alice.get("/memories").json() == before
    r = alice.post("/ask/batch", json={"questions": ["fine", "fine too", " "]})
    assert r.status_code == 422 and r.json()["detail"] == "index 2: question is empty"
    # POST /train takes its one option in the query: a body (a client's {"full": true}) is refused, not ignored.
    r = alice.post("/train", json={"full": True})
    assert r.status_code == 422 and "?full=true" in r.json()["detail"]
    assert alice.get("/status").json()["training_job"] is None
    with client(live) as stranger:
        assert stranger.post("/train", json={"full": True}).status_code == 401  # the key is checked first
    with client(live, "key-empty") as c:  # an empty body, as many clients send one, is no body: on to the 409
        for empty in ({}, None):
            r = c.post("/train", content=json.dumps(empty), headers={"Content-Type": "application/json"})
            assert r.status_code == 409 and "no memories" in r.json()["detail"], r.text


def test_openapi_describes_every_422_as_the_server_sends_it(live, alice):
    """Every 422 is `{"detail": message}`, and a GET /memories listing fits the /import schema."""
    import json

    spec = alice.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if "422" in op["responses"]:
                assert op["responses"]["422"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorOut"}, (method, path)
    memories = spec["paths"]["/import"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]
    alice.post("/memories", json={"id": "test_schema_listed", "text": "A memory listed for the import schema."})
    listed = alice.get("/memories").json()
    assert listed and all(set(m) <= set(memories["items"]["properties"]) for m in listed)


def test_request_bodies_are_limited(live, alice):
    big = b'{"text": "' + b"a" * MAX_BODY_BYTES + b'"}'
    r = alice.post("/memories", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"text": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}'
    r = alice.post("/memories", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # /import takes larger bodies (the limit is per route), from a known key only.
    many = [{"text": f"Fact number {i}: " + "b" * 2000} for i in range(600)]
    with client(live, "not-a-key") as c:
        assert c.post("/import", json=many).status_code == 413
        assert c.post("/import", json=many[:1]).status_code == 401
    with client(live, "key-bulk") as c:
        r = c.post("/import", json=many)
        assert r.status_code == 201 and r.json()["memories"] == 600, r.text[:300]
        for mid in r.json()["ids"][:3]:
            assert c.get(f"/memories/{mid}").status_code == 200


def _start_server(tmp_path, keys: dict, *args) -> tuple:
    """`python -m ipm.server` on a free port, once it answers /health: (process, base URL)."""
    import json
    import subprocess
    import sys

    (tmp_path / "keys.json").write_text(json.dumps(keys))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ipm.server", "--keys", str(tmp_path / "keys.json"),
                             "--home", str(tmp_path / "home"), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "IPM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)


def _stop_server(proc) -> str:
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


def test_serve_with_train_after_trains_each_keys_namespace_by_itself(tiny_model, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "ipm.toml").write_text(f'base_model = "{tiny_model}"\nepochs = 4\nlora_layers = 2\nlora_r = 8\n'
                                   'questions_per_memory = 8\nabstain_threshold = 0.0\n')
    ipm.open(home, cache=tmp_path / "cache").add("Not served: no key names this namespace.", user="zed")
    proc, url = _start_server(tmp_path, {"key-alice": "alice"}, "--train-after", "1")
    try:
        with httpx.Client(base_url=url, headers={"X-API-Key": "key-alice"}, timeout=60) as c:
            assert c.post("/import", json=[{"id": k, "text": v} for k, v in MEMORIES.items()]).status_code == 201
            deadline = time.monotonic() + 300
            while c.get("/status").json()["index_version"] is None:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not train by itself"
                time.sleep(0.5)
            status = c.get("/status").json()
            assert (status["indexed"], status["pending"]) == (len(MEMORIES), 0)
            assert [e["action"] for e in c.get("/log").json()].count("train") == 1
    finally:
        err = _stop_server(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert ipm.open(home, cache=tmp_path / "cache").untrained("zed")  # its namespace was left alone


def test_sigterm_stops_the_server_with_exit_code_0(tmp_path):
    """A service manager stops the server with SIGTERM: it shuts down gracefully and exits 0,
    having run its own shutdown code, not killed by the signal uvicorn raises again after."""
    proc, _ = _start_server(tmp_path, {"key-alice": "alice"})
    err = _stop_server(proc)
    assert proc.returncode == 0, err
    assert "Finished server process" in err and "Traceback" not in err


def test_a_port_in_use_is_one_line_and_exit_code_1(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "keys.json").write_text(json.dumps({"key-alice": "alice"}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "ipm.server", "--keys", str(tmp_path / "keys.json"),
                               "--home", str(tmp_path / "home"), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_a_request_under_way_at_shutdown_gets_503_and_the_server_does_not_wait_for_it(tmp_path):
    """Stopped while a request runs past the 5 s grace period: the client gets a JSON 503, and
    the process exits then, not once the request's worker thread is done."""
    import subprocess
    import sys

    script = tmp_path / "slow_server.py"
    script.write_text(
        "import sys, time\n"
        "import ipm\n"
        "from ipm import server\n"
        "plain = server.create_app\n"
        "def create_app(mem, keys):\n"
        "    app = plain(mem, keys)\n"
        "    @app.get('/slow')\n"
        "    def slow():\n"
        "        time.sleep(60)\n"
        "    return app\n"
        "server.create_app = create_app\n"
        "server.serve(ipm.open(sys.argv[2]), {'key-alice': 'alice'}, port=int(sys.argv[1]))\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path / "home")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        answer = {}

        def call():
            answer["r"] = httpx.get(f"{url}/slow", headers={"X-API-Key": "key-alice"}, timeout=60)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1)
        stopped = time.monotonic()
        err = _stop_server(proc)
        took = time.monotonic() - stopped
        caller.join(30)
    finally:
        proc.kill()
    r = answer["r"]
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    assert "stopping" in r.json()["detail"]
    assert proc.returncode == 0 and took < 20, (took, err)
    assert "still under way" in err


def test_keys_file_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("IPM_API_KEYS", raising=False)
    with pytest.raises(InvalidInput, match="no API keys"):
        load_keys(None)
    p = tmp_path / "keys.json"
    for bad, msg in [("{}", "no API keys"), ("[]", "expected a JSON object"), ("{", "not valid JSON"),
                     ('{"k": "bad namespace!"}', "namespace"), ('{"": "alice"}', "non-empty"), ('{"k": 1}', "string"),
                     ('{"k": "alice", "k": "bob"}', "given twice")]:
        p.write_text(bad)
        with pytest.raises(InvalidInput, match=msg):
            load_keys(p)
    with pytest.raises(NotFound, match="keys file .* does not exist"):
        load_keys(tmp_path / "missing.json")
    with pytest.raises(InvalidInput, match="keys file .* is a directory"):
        load_keys(tmp_path)
    p.write_bytes(b'\xef\xbb\xbf{"k0": "alice"}')  # a byte-order mark is not part of the JSON
    assert load_keys(p) == {"k0": "alice"}
    p.write_text('{"k1": "alice", "k2": "bob"}')
    assert load_keys(p) == {"k1": "alice", "k2": "bob"}
    monkeypatch.setenv("IPM_API_KEYS", '{"k3": "carol"}')
    assert load_keys(None) == {"k3": "carol"}
    assert load_keys(p) == {"k1": "alice", "k2": "bob"}  # the file wins
    with pytest.raises(InvalidInput):
        create_app(None, {})


# -- training and recall ------------------------------------------------------------------------

def _wait(c: httpx.Client, job_id: str, while_waiting=None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/train/{job_id}").json()
        assert job["job_id"] == job_id and job["status"] in ("queued", "running", "done", "failed"), job
        if job["status"] in ("done", "failed"):
            return job
        if while_waiting:
            while_waiting()
        assert time.monotonic() < deadline, f"training did not finish: {job}"
        time.sleep(0.1)


def test_train_in_background_while_answering(live, bob):
    with client(live, "key-carol") as c:
        assert c.post("/train").status_code == 409  # nothing to train on yet
        assert c.post("/import", json=[{"id": k, "text": v} for k, v in MEMORIES.items()]).status_code == 201
        r = c.post("/train")
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and r.headers["location"] == f"/train/{job['job_id']}"
        again = c.post("/train")
        assert again.status_code == 409 and job["job_id"] in again.json()["detail"]
        assert c.get("/status").json()["training_job"] == job["job_id"]
        assert bob.get(f"/train/{job['job_id']}").status_code == 404  # another namespace's job
        gone = bob.get("/train/0123456789abcdef")
        assert gone.status_code == 404 and "until it restarts" in gone.json()["detail"]

        answered = []

        def ask_pending():  # no index yet: new memories are matched by their words
            r = c.post("/ask", json={"question": "Where does my sister Anna live?", "k": 2})
            assert r.status_code == 200, r.text
            # The new index can become current during the ask: only an answer given while no
            # index existed after it must come from the pending (not yet trained) path.
            if c.get("/status").json()["index_version"] is None:
                answered.append(r.json())

        done = _wait(c, job["job_id"], ask_pending)
        assert done["status"] == "done", done
        assert done["phase"] == "calibrate" and done["done"] == done["total"] and isinstance(done["loss"], float)
        assert done["manifest"]["version"] == "v0001" and done["manifest"]["memories"] == 4
        assert answered and all(a["hits"][0]["id"] == "family_sister_anna" and a["hits"][0]["pending"]
                                for a in answered)

        # The index answers now: every hit is a stored text, verbatim, for its ID.
        for text in MEMORIES.values():
            a = c.post("/ask", json={"question": text, "k": 2}).json()
            assert set(a) == {"question", "abstained", "hits"} and a["question"] == text
            assert a["hits"] and not a["abstained"]
            for h in a["hits"]:
                assert set(h) == {"id", "text", "score"} and h["text"] == MEMORIES[h["id"]]
        status = c.get("/status").json()
        assert (status["index_version"], status["indexed"], status["pending"], status["training_job"]) == \
               ("v0001", 4, 0, None)

        # Retrain with one more memory: v0001 keeps answering until v0002 is complete.
        new = c.post("/memories", json={"id": "hobby_music_piano", "text": "I play the piano every evening."}).json()
        job2 = c.post("/train").json()
        seen = []

        def ask_indexed():
            a = c.post("/ask", json={"question": MEMORIES["work_job_acme"], "k": 4}).json()
            seen.append(a)
            assert any(not h.get("pending") for h in a["hits"]), a

        done2 = _wait(c, job2["job_id"], ask_indexed)
        assert done2["status"] == "done" and done2["manifest"]["version"] == "v0002"
        assert c.get("/status").json()["indexed"] == 5
        a = c.post("/ask", json={"question": new["text"], "k": 5}).json()
        assert all(h["text"] == (MEMORIES | {new["id"]: new["text"]})[h["id"]] and not h.get("pending")
                   for h in a["hits"])

        # Forgetting takes effect at once, index or not.
        assert c.delete("/memories/personal_pet_max").status_code == 200
        for q in (MEMORIES["personal_pet_max"], "what is my dog called?"):
            a = c.post("/ask", json={"question": q, "k": 5}).json()
            assert "personal_pet_max" not in [h["id"] for h in a["hits"]]
        assert [e["action"] for e in c.get("/log").json()].count("train") == 2


def test_concurrent_requests(live):
    """Many clients at once, writes and recall mixed, while a training job runs."""
    from concurrent.futures import ThreadPoolExecutor

    with client(live, "key-fuzz") as c:
        c.post("/import", json=[{"text": f"My friend number {i} likes chess."} for i in range(5)])
        assert c.post("/train").status_code == 202

    def work(i):
        with client(live, "key-fuzz") as c:
            m = c.post("/memories", json={"text": f"Parallel memory {i} about gardening."}).json()
            r = c.put(f"/memories/{m['id']}", json={"text": f"Parallel memory {i} about tomatoes."})
            assert r.status_code == 200
            assert c.post("/ask", json={"question": "who likes chess?", "k": 3}).status_code == 200
            assert c.get(f"/memories/{m['id']}").json()["version"] == 2
            return m["id"]

    def forget(mid):
        with client(live, "key-fuzz") as c:
            assert c.delete(f"/memories/{mid}").status_code == 200
            assert c.post("/ask", json={"question": "Parallel memory about tomatoes", "k": 3}).status_code == 200

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(work, range(16)))
        assert len(set(ids)) == 16  # minted IDs stay unique under concurrent writes
        list(pool.map(forget, ids))
    with client(live, "key-fuzz") as c:
        job = c.get("/status").json()["training_job"]
        if job:
            assert _wait(c, job)["status"] in ("done", "failed")
        assert not set(ids) & {m["id"] for m in c.get("/memories").json()}


# -- fuzzing -----------------------------------------------------------------------------------------

def test_openapi_fuzz(live):
    """Schemathesis over every operation of the live server's own OpenAPI spec: generated valid
    requests (30 per operation) and invalid ones (15 per operation) never get a 5xx, and every
    response matches the spec (status code, content type, body schema)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == 14
    seen: dict[str, Counter] = {}
    with client(live, "key-fuzz") as c:  # a memory that exists, for the /memories/{id} routes
        assert c.post("/memories", json={"id": "fuzz_target_one", "text": "A memory to fuzz."}).status_code == 201

    def fuzz(strategy, n: int, key: str, name: str) -> None:
        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=strategy)
        def run(case):
            r = case.call_and_validate(base_url=live.url, headers={"Authorization": f"Bearer {key}"},
                                       checks=checks, timeout=60)
            seen.setdefault(name, Counter())[r.status_code] += 1

        run()

    for op in operations:
        name = f"{op.method.upper()} {op.path}"
        # Training is fuzzed on a namespace with no memories (409), so no job starts.
        key = "key-empty" if op.path == "/train" else "key-fuzz"
        rounds = [(GenerationMode.POSITIVE, 30, None), (GenerationMode.NEGATIVE, 15, None)]
        if op.path.startswith("/memories/{id}") and op.method != "delete":
            rounds.insert(0, (GenerationMode.POSITIVE, 10, {"id": "fuzz_target_one"}))
        for mode, n, path_parameters in rounds:
            try:
                fuzz(op.as_strategy(generation_mode=mode, path_parameters=path_parameters), n, key, name)
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE
            except Exception as e:
                raise AssertionError(f"{name} ({mode.value}): {e}") from e
    print({k: dict(v) for k, v in seen.items()})
    # The key was accepted everywhere, and valid requests were served, not just refused.
    assert not any(401 in c for c in seen.values()), seen
    for name in ("GET /health", "POST /memories", "GET /memories", "GET /memories/{id}", "PUT /memories/{id}",
                 "GET /memories/{id}/history", "POST /import", "POST /ask", "GET /status", "GET /log"):
        assert any(200 <= code < 300 for code in seen[name]), (name, seen[name])


def test_a_closed_trainer_starts_no_more_jobs(mem):
    from ipm.errors import TrainingError
    from ipm.server import Trainer

    trainer = Trainer(mem)
    assert trainer.close() == []  # nothing running
    with pytest.raises(TrainingError, match="stopping"):
        trainer.submit("alice")


def test_train_after_leaves_a_namespace_to_its_post_train_job_and_trains_it_if_that_job_failed(mem, monkeypatch):
    from ipm.errors import TrainingError
    from ipm.server import Trainer

    def finished(job_id: str) -> dict:
        deadline = time.monotonic() + 120
        while (job := trainer.get(job_id, "alice"))["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        return job

    for mid, text in MEMORIES.items():
        mem.add(text, id=mid, user="alice")
    calls, fail = [], threading.Event()
    real_train = mem.train

    def train(user, **kw):
        calls.append(user)
        if len(calls) == 1:  # the POST /train job: it fails once let go
            fail.wait(60)
            raise TrainingError("the disk is full")
        return real_train(user=user, **kw)

    monkeypatch.setattr(mem, "train", train)
    trainer = Trainer(mem)
    auto = trainer.watch(["alice"], quiet_s=1)
    manual = trainer.submit("alice").id
    assert auto.check(now=0) == [] and auto.check(now=5) == []  # due, but that job is under way
    fail.set()
    assert finished(manual)["status"] == "failed"
    assert auto.check(now=6) == ["alice"]  # no new change needed
    assert finished(trainer.active("alice"))["status"] == "done" and calls == ["alice", "alice"]
    assert mem.untrained("alice") == [] and auto.check(now=100) == []


def test_train_after_tries_again_when_its_job_met_an_ipm_train_of_another_process(mem, monkeypatch):
    from ipm.errors import TrainingInProgress
    from ipm.server import Trainer

    mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max", user="alice")
    calls = []

    def train(user, **kw):
        calls.append(user)
        if len(calls) == 1:
            raise TrainingInProgress("namespace 'alice' is being trained already")
        return {"version": "v0001", "ids": {}}

    monkeypatch.setattr(mem, "train", train)
    trainer = Trainer(mem)
    auto = trainer.watch(["alice"], quiet_s=1)

    def settled():
        deadline = time.monotonic() + 30
        while trainer.active("alice") is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    assert auto.check(now=0) == [] and auto.check(now=2) == ["alice"]  # submitted: refused in the job
    settled()
    assert auto.check(now=3) == ["alice"]  # again, with no new change
    settled()  # (before the fake train is undone: the job thread would train for real at exit)
    assert calls == ["alice", "alice"]


def test_an_unexpected_error_is_500_with_what_a_user_can_act_on(live, monkeypatch):
    """The machine's errors (a full disk) say what they are; a defect says only its type."""
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/ipm.db")

    def defect(*args, **kwargs):
        raise RuntimeError("secret internals")

    with client(live, "key-carol") as c:
        monkeypatch.setattr(live.mem, "ask", full_disk)
        r = c.post("/ask", json={"question": "anything?"})
        assert r.status_code == 500 and r.json() == {"detail": "No space left on device"}  # not the server's paths
        monkeypatch.setattr(live.mem, "ask", defect)
        r = c.post("/ask", json={"question": "anything?"})
        assert r.status_code == 500 and r.json() == {"detail": "internal error: RuntimeError"}
