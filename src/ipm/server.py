"""HTTP server: a thin JSON layer over one `ipm.IPM` object, for many users.

    app = create_app(ipm.open("./.ipm"), {"key-of-alice": "alice", "key-of-bob": "bob"})

Every request (except GET /health) carries an API key, as `Authorization: Bearer <key>` or
`X-API-Key: <key>`. The key decides the namespace: a request can never name another one.
Each route calls one `IPM` method; errors of the engine become HTTP statuses with
`{"detail": message}`. Training runs in a background thread, one job at a time over the whole
server (one per namespace at most), while recall keeps answering from the previous index.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from . import __version__
from .config import read_user_file
from .engine import IPM, STORED_FIELDS, json_safe, unique_keys
from .errors import (DuplicateID, HomeError, IndexDamaged, IndexMissing, InvalidInput, IPMError, ModelError, NotFound,
                     TrainingError, TrainingInProgress, environment_error_message)
from .ids import ID_PATTERN, MAX_ID_LENGTH
from .store import MAX_QUESTION_CHARS, Memory, check_namespace  # Memory: the response schema of /memories

log = logging.getLogger("ipm.server")

MAX_BODY_BYTES = 1 << 20  # one memory is at most 64 KiB of UTF-8; JSON escaping can grow it 6x
MAX_IMPORT_BYTES = 64 << 20
MAX_FINISHED_JOBS = 200  # finished training jobs remembered for polling
KEYS_ENV = "IPM_API_KEYS"

# JSON-Schema facts the engine enforces; documented here so the OpenAPI spec is precise.
# (The engine does the checking, with its own messages: these never validate anything.)
_ID_SCHEMA = {"pattern": ID_PATTERN.pattern, "maxLength": MAX_ID_LENGTH}
_TEXT_SCHEMA = {"minLength": 1, "pattern": r"\S"}
_QUESTION_SCHEMA = {"minLength": 1, "maxLength": MAX_QUESTION_CHARS, "pattern": r"\S"}


# -- request and response bodies -----------------------------------------------------------

class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "2" -> 2, no true -> 1


class MemoryIn(_In):
    text: str = Field(description="The memory, stored byte-exact (at most 64 KiB of UTF-8).",
                      json_schema_extra=_TEXT_SCHEMA)
    id: Optional[str] = Field(None, description="Semantic ID `domain_topic_entity`; minted from the text if omitted.",
                              json_schema_extra=_ID_SCHEMA)
    questions: list[str] = Field(default_factory=list, description="Questions this memory answers (training data).",
                                 json_schema_extra={"items": {"type": "string", **_QUESTION_SCHEMA}})


class UpdateIn(_In):
    text: str = Field(description="The new text; the old version is kept in the history.",
                      json_schema_extra=_TEXT_SCHEMA)


class AskIn(_In):
    question: str = Field(json_schema_extra=_QUESTION_SCHEMA)
    k: int = Field(1, description="How many hits at most (up to the config's max_k, 100 by default).",
                   json_schema_extra={"minimum": 1})


class AskManyIn(_In):
    questions: list[str] = Field(min_length=1, max_length=256, description="Questions, answered in one batch.",
                                 json_schema_extra={"items": _QUESTION_SCHEMA})
    k: int = Field(1, description="How many hits at most (up to the config's max_k, 100 by default).",
                   json_schema_extra={"minimum": 1})


class VersionOut(BaseModel):
    version: int
    text: str
    sha256: str
    created_at: str


class HitOut(BaseModel):
    id: str
    text: str
    score: float
    pending: Optional[bool] = Field(None, description="Present (true) for a memory added since the last training, "
                                                      "matched by its words instead of by the index.")


class AnswerOut(BaseModel):
    question: str
    abstained: bool
    hits: list[HitOut]


class ImportOut(BaseModel):
    memories: int
    questions: int
    ids: list[str]


class ForgottenOut(BaseModel):
    forgotten: str


class TrainJobOut(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    phase: Optional[Literal["questions", "embed", "train", "calibrate"]]
    done: int
    total: int
    loss: Optional[float]
    manifest: Optional[dict[str, Any]] = Field(None, description="Summary of the new index version (when done).")
    error: Optional[str] = Field(None, description="Why the job failed (when failed).")


class StatusOut(BaseModel):
    user: str
    memories: int
    indexed: int
    pending: int = Field(description="Memories added since the last training: found by their words until the next.")
    changed: int = Field(description="Indexed memories updated since the last training (the next one relearns them).")
    index_version: Optional[str]
    base_model: Optional[str]
    training_job: Optional[str] = Field(description="The queued or running training job of this namespace, if any.")


class EventOut(BaseModel):
    seq: int
    ts: str
    namespace: str
    action: str
    ids: list[str]
    detail: dict[str, Any]


class HealthOut(BaseModel):
    status: Literal["ok"]
    version: str


class ErrorOut(BaseModel):
    detail: str


def _err(*codes: int) -> dict:
    return {c: {"model": ErrorOut} for c in codes}


# A GET /memories listing imports as it is: the fields it adds are taken and ignored, but for
# sha256, which must be the text's (engine.parse_records).
_LISTED_FIELDS = {
    **{name: {"description": "Ignored (a field of a listing)."} for name in sorted(STORED_FIELDS - {"sha256"})},
    "sha256": {"type": "string", "description": "If given, the SHA-256 of the text's UTF-8: a text edited since "
                                                "it was listed is refused."},
}

_IMPORT_BODY = {
    "description": "Memories `[{text, id?, questions?}]` (or `{id: text}`), or training questions for existing "
                   "memories `[{question, memory_id}]`, as in a file for `ipm import` (which may also be JSON lines, one "
                   "record a line). All or nothing: one bad record writes nothing.",
    "required": True,
    "content": {"application/json": {"schema": {"oneOf": [
        {"type": "array", "minItems": 1, "title": "Memories", "items": {
            "type": "object", "additionalProperties": False, "required": ["text"],
            "properties": {"text": {"type": "string", **_TEXT_SCHEMA},
                           "id": {"type": "string", **_ID_SCHEMA},
                           "questions": {"type": "array", "items": {"type": "string", **_QUESTION_SCHEMA}},
                           **_LISTED_FIELDS}}},
        {"type": "array", "minItems": 1, "title": "Questions", "items": {
            "type": "object", "additionalProperties": False, "required": ["question", "memory_id"],
            "properties": {"question": {"type": "string", **_QUESTION_SCHEMA},
                           "memory_id": {"type": "string", **_ID_SCHEMA}}}},
        {"type": "object", "minProperties": 1, "title": "Memories by ID",
         "propertyNames": _ID_SCHEMA, "additionalProperties": {"type": "string", **_TEXT_SCHEMA}},
    ]}}},
}


# -- API keys ---------------------------------------------------------------------------------

def parse_keys(data: Any, source: str) -> dict[str, str]:
    """Check a `{key: namespace}` mapping; raise InvalidInput saying what is wrong."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: expected a JSON object {{\"api-key\": \"namespace\", ...}}")
    if not data:
        raise InvalidInput(f"{source} holds no API keys; the server refuses to run without any")
    for key, ns in data.items():
        if not isinstance(key, str) or not key.strip() or key != key.strip():
            raise InvalidInput(f"{source}: API keys must be non-empty strings without surrounding spaces")
        if not isinstance(ns, str):
            raise InvalidInput(f"{source}: the namespace of each API key must be a string")
        try:
            check_namespace(ns)
        except InvalidInput as e:
            raise InvalidInput(f"{source}: {e}") from None
    return dict(data)


def load_keys(path: str | Path | None = None) -> dict[str, str]:
    """API keys from a JSON file `{"key": "namespace"}`, else from $IPM_API_KEYS (same JSON inline)."""
    if path is not None:
        raw, source = read_user_file(path, "keys file"), str(path)
    elif os.environ.get(KEYS_ENV, "").strip():
        raw, source = os.environ[KEYS_ENV], f"${KEYS_ENV}"
    else:
        raise InvalidInput(f"no API keys: pass --keys FILE (a JSON object {{\"api-key\": \"namespace\"}}) "
                           f"or set {KEYS_ENV} to that JSON; the server refuses to run without keys")
    try:
        data = json.loads(raw, object_pairs_hook=unique_keys)  # a key given twice: refused, not the last kept
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{source} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except InvalidInput as e:
        raise InvalidInput(f"{source}: {e}") from None
    return parse_keys(data, source)


# -- training jobs ----------------------------------------------------------------------------

class _Job:
    def __init__(self, namespace: str, full: bool = False):
        self.id = uuid.uuid4().hex
        self.namespace = namespace
        self.full = full  # retrain from scratch instead of incrementally
        self.status = "queued"
        self.phase: str | None = None
        self.done = 0
        self.total = 0
        self.loss: float | None = None
        self.manifest: dict | None = None
        self.error: str | None = None
        self.finished_at: float | None = None

    def to_dict(self) -> dict:
        d = {"job_id": self.id, "status": self.status, "phase": self.phase, "done": self.done,
             "total": self.total, "loss": self.loss}
        if self.manifest is not None:
            d["manifest"] = self.manifest
        if self.error is not None:
            d["error"] = self.error
        return d


def _manifest_summary(manifest: dict) -> dict:
    """What a client needs of a new index version (the manifest without its ID list and config)."""
    base = manifest.get("base_model") or {}
    return json_safe({"namespace": manifest.get("namespace"), "version": manifest.get("version"),
                      "created_at": manifest.get("created_at"),
                      "base_model": {"name": base.get("name"), "sha256": base.get("sha256")},
                      "memories": len(manifest.get("ids") or ()), "threshold": manifest.get("threshold"),
                      "up_to_date": bool(manifest.get("up_to_date")), "metrics": manifest.get("metrics")})


class Trainer:
    """Runs training jobs one at a time in a daemon thread; at most one live job per namespace."""

    def __init__(self, mem: IPM):
        self.mem = mem
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._active: dict[str, _Job] = {}  # namespace -> queued or running job
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._watchers: list = []  # the AutoTrains of `watch`, told of a job refused for another training

    def submit(self, namespace: str, full: bool = False) -> _Job:
        with self._lock:
            if self._closing:
                raise TrainingError("the server is stopping: it starts no more training jobs")
            if namespace in self._active:
                job = self._active[namespace]
                raise TrainingError(f"a training job ({job.id}) is already {job.status} for this namespace; "
                                    f"poll GET /train/{job.id} until it is done")
            job = _Job(namespace, full)
            self._jobs[job.id] = job
            self._active[namespace] = job
            self._forget_old()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="ipm-train", daemon=True)
                self._thread.start()
        self._queue.put(job)
        return job

    def watch(self, namespaces: list[str], quiet_s: float, poll_s: float | None = None):
        """An AutoTrain (not started) that trains `namespaces` as jobs of this trainer once
        their memories settle, leaving a namespace to a job already under way for it."""
        from .autotrain import AutoTrain

        auto = AutoTrain(self.mem, quiet_s, self.submit, namespaces=namespaces, poll_s=poll_s,
                         busy=lambda ns: self.active(ns) is not None)
        self._watchers.append(auto)
        return auto

    def get(self, job_id: str, namespace: str) -> dict | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.to_dict() if job is not None and job.namespace == namespace else None

    def active(self, namespace: str) -> str | None:
        with self._lock:
            job = self._active.get(namespace)
            return job.id if job else None

    def running(self) -> list[str]:
        """Namespaces with a job running now."""
        with self._lock:
            return [ns for ns, job in self._active.items() if job.status == "running"]

    def close(self) -> list[str]:
        """Start no more jobs (a queued one fails, saying so); returns the namespaces whose job
        is running now, which goes on until it ends or the process does."""
        with self._lock:
            self._closing = True
        return self.running()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished_at is not None]
        for j in finished[:max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[j.id]

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._run(job)
            finally:
                self._queue.task_done()

    def _run(self, job: _Job) -> None:
        def progress(phase, done, total, loss):
            with self._lock:
                job.phase, job.done, job.total = phase, done, total
                if loss is not None and math.isfinite(loss):
                    job.loss = float(loss)

        with self._lock:
            if self._closing:
                job.status, job.error, job.finished_at = "failed", "the server stopped before the job ran", time.time()
                self._active.pop(job.namespace, None)
                return
            job.status = "running"
        try:
            manifest = self.mem.train(user=job.namespace, progress=progress, full=job.full)
            result = {"status": "done", "manifest": _manifest_summary(manifest)}
        except IPMError as e:
            log.warning("training job %s (namespace %s) failed: %s", job.id, job.namespace, e)
            result = {"status": "failed", "error": str(e)}
            if isinstance(e, TrainingInProgress):  # an `ipm train` in another process: tried again later
                for watcher in self._watchers:
                    watcher.retry_later(job.namespace)
        except Exception as e:  # a bug: keep the server up and say what happened
            log.exception("training job %s failed", job.id)
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        with self._lock:
            job.status = result["status"]
            job.manifest = result.get("manifest")
            job.error = result.get("error")
            job.finished_at = time.time()
            self._active.pop(job.namespace, None)


# -- request body size limit -------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: refuse request bodies over a size limit with 413, before the app sees them.

    `limits` raises the limit for some paths, for requests with a known API key only
    (`authorized(scope)`): a stranger cannot make the server buffer a large body."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, limits: dict[str, int] | None = None, authorized=None):
        self.app = app
        self.limit = limit
        self.limits = limits or {}
        self.authorized = authorized or (lambda scope: True)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        if scope["path"] in self.limits and self.authorized(scope):
            limit = self.limits[scope["path"]]
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_error(send, 413, f"request body is larger than {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _send_error(send, 413, f"request body is larger than {limit} bytes")
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_error(send, status: int, detail: str) -> None:
    """An error response `{"detail": ...}` sent from ASGI middleware, closing the connection."""
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


# -- requests under way when the server stops ---------------------------------------------------

class StopGuard:
    """ASGI middleware: a request still under way when the server stops past its grace period is
    answered 503 `{"detail": ...}` (uvicorn cancels it and would send a bare text 500)."""

    def __init__(self, app, cut_off: list):
        self.app = app
        self.cut_off = cut_off  # the paths of the requests it answered so (see serve)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if started:
                raise
            # Its worker thread may still be inside the model: serve() ends the process once the
            # server is down, instead of waiting for it.
            self.cut_off.append(scope["path"])
            await _send_error(send, 503, "the server is stopping: send the request again once it is back")


# -- JSON bodies ----------------------------------------------------------------------------------

class _StrictJSONRequest(Request):
    """A request whose JSON body may not give a key twice (json.loads keeps the last silently:
    `{"id": "a", "id": "b"}` would add the memory under "b"), as /import and the keys file refuse."""

    async def json(self):
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=unique_keys)
        return self._json


class _StrictJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


def _errors_as_detail(schema: dict) -> dict:
    """The OpenAPI document with every 422 response described as the server sends it,
    `{"detail": message}`, instead of FastAPI's default list of validation errors."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422")
            if response is not None:
                response["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


# -- the app -------------------------------------------------------------------------------------

def _status_of(e: IPMError) -> int:
    if isinstance(e, DuplicateID):
        return 409
    if isinstance(e, InvalidInput):  # InvalidID included
        return 422
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, (IndexMissing, TrainingError)):
        return 409
    if isinstance(e, ModelError):
        return 503
    if isinstance(e, (IndexDamaged, HomeError)):  # the server's own files, not the request
        return 500
    return 400


def _validation_message(request: Request, exc: RequestValidationError) -> str:
    """One line naming each bad field, e.g. `k: Input should be a valid integer`."""
    parts = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON ({(err.get('ctx') or {}).get('error', 'decode error')})"
        if loc == ["body"] and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            ctype = request.headers.get("content-type", "")
            if "json" not in ctype:
                return "send the request body as a JSON object with Content-Type: application/json"
            parts.append("request body: expected a JSON object" if err["type"] != "missing"
                         else "request body: missing (expected a JSON object)")
            continue
        where = ".".join(str(x) for x in loc if x != "body") or "request body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(mem: IPM, api_keys: dict[str, str]) -> FastAPI:
    """The HTTP API over `mem`. `api_keys` maps each API key to the one namespace it may use."""
    keys = parse_keys(api_keys, "api_keys")
    key_items = [(k.encode(), ns) for k, ns in keys.items()]
    trainer = Trainer(mem)

    def lookup(given: bytes) -> str | None:
        """The namespace of an API key (as the header's bytes), comparing with every key in constant time."""
        found = None
        for k, ns in key_items:
            if hmac.compare_digest(k, given):
                found = ns
        return found

    def authorized(scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        scheme, _, cred = auth.partition(b" ")
        given = cred.strip() if scheme.lower() == b"bearer" else headers.get(b"x-api-key", b"")
        return bool(given) and lookup(given) is not None

    app = FastAPI(title="IPM", version=__version__, separate_input_output_schemas=False,
                  generate_unique_id_function=lambda route: route.name,
                  description="Indexed Parametric Memory: memories stored verbatim under semantic IDs, recalled "
                              "through a trained LoRA index. Every route but /health needs an API key; the key "
                              "decides the namespace.")
    app.router.route_class = _StrictJSONRoute  # before any route is added
    app.state.mem, app.state.trainer = mem, trainer
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, limits={"/import": MAX_IMPORT_BYTES}, authorized=authorized)
    app.state.cut_off = []
    app.add_middleware(StopGuard, cut_off=app.state.cut_off)  # outermost: it sees any cancelled request

    openapi = app.openapi

    def described_openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _errors_as_detail(openapi())
        return app.openapi_schema

    app.openapi = described_openapi

    bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
    header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <API key>`")

    def namespace(cred: Optional[HTTPAuthorizationCredentials] = Security(bearer),
                  x_api_key: Optional[str] = Security(header_key)) -> str:
        given = cred.credentials if cred is not None else x_api_key
        if given:
            found = lookup(given.encode("latin-1", "replace"))  # the header's bytes, as Starlette decoded them
            if found is not None:
                return found
        raise HTTPException(401, "missing or unknown API key: send `Authorization: Bearer <key>` or `X-API-Key`",
                            headers={"WWW-Authenticate": "Bearer"})

    User = Depends(namespace)

    @app.exception_handler(IPMError)
    async def ipm_error(request: Request, exc: IPMError):
        return JSONResponse({"detail": str(exc)}, status_code=_status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_message(request, exc)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 400 and isinstance(exc.__cause__, InvalidInput):  # a key twice (_StrictJSONRequest)
            return JSONResponse({"detail": f"request body: {exc.__cause__}"}, status_code=422)
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not decode the body
            return JSONResponse({"detail": f"request body is not valid JSON ({type(exc.__cause__).__name__})"},
                                status_code=422)
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # the traceback is logged by the ASGI server
        said = environment_error_message(exc, with_path=False)  # a full disk, another process's lock
        # uvicorn closes the connection after an error that reached it: say so, or a keep-alive
        # client sends its next request down a closed connection and gets a reset
        return JSONResponse({"detail": said or f"internal error: {type(exc).__name__}"}, status_code=500,
                            headers={"Connection": "close"})

    auth_errors = _err(401)
    body_errors = _err(401, 409, 413, 422)

    @app.get("/health", response_model=HealthOut, tags=["server"])
    async def health():  # on the event loop: answers while every worker thread waits for a model to load
        """Liveness; needs no key."""
        return {"status": "ok", "version": __version__}

    @app.post("/memories", status_code=201, response_model=Memory, responses=_err(401, 409, 413, 422),
              tags=["memories"])
    def add(body: MemoryIn, user: str = User):
        """Add one memory (409 if its ID is taken)."""
        return mem.add(body.text, id=body.id, questions=body.questions, user=user).to_dict()

    @app.get("/memories", response_model=list[Memory], responses=_err(401, 422), tags=["memories"])
    def list_memories(user: str = User, limit: Optional[int] = Query(None, ge=1, description="At most this many."),
                      offset: int = Query(0, ge=0, description="Skip this many first.")):
        """The namespace's memories, oldest first (every one unless `limit` is given)."""
        return [m.to_dict() for m in mem.list(user=user, limit=limit, offset=offset)]

    @app.get("/memories/{id}", response_model=Memory, responses=_err(401, 404), tags=["memories"])
    def get(id: str, user: str = User):
        return mem.get(id, user=user).to_dict()

    @app.put("/memories/{id}", response_model=Memory, responses=_err(401, 404, 413, 422), tags=["memories"])
    def update(id: str, body: UpdateIn, user: str = User):
        """Replace a memory's text; the old version moves to its history."""
        return mem.update(id, body.text, user=user).to_dict()

    @app.delete("/memories/{id}", response_model=ForgottenOut, responses=_err(401, 404), tags=["memories"])
    def forget(id: str, user: str = User):
        """Erase a memory, its questions and its history; it is never recalled again."""
        mem.forget(id, user=user)
        return {"forgotten": id}

    @app.get("/memories/{id}/history", response_model=list[VersionOut], responses=_err(401, 404), tags=["memories"])
    def history(id: str, user: str = User):
        """Earlier versions (oldest first), then the current one."""
        return mem.history(id, user=user)

    @app.post("/import", status_code=201, summary="Import", name="import", response_model=ImportOut,
              responses=body_errors, tags=["memories"], openapi_extra={"requestBody": _IMPORT_BODY})
    async def import_(request: Request, user: str = User):
        """Import memories, or training questions for existing memories: all or nothing."""
        raw = await request.body()
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_import, raw, user)  # parsed there: a big body would hold up every request

    def _import(raw: bytes, user: str) -> dict:
        try:
            return mem.import_text(raw, user=user, source="request body").to_dict()
        except NotFound as e:  # a question naming an unknown memory: the body is at fault
            raise InvalidInput(str(e)) from None

    @app.post("/ask", response_model=AnswerOut, response_model_exclude_none=True, responses=_err(401, 413, 422, 503),
              tags=["recall"])
    def ask(body: AskIn, user: str = User):
        """Recall up to k memories for a question, or abstain (`abstained: true`, no hits)."""
        return mem.ask(body.question, k=body.k, user=user).to_dict()

    @app.post("/ask/batch", response_model=list[AnswerOut], response_model_exclude_none=True,
              responses=_err(401, 413, 422, 503), tags=["recall"])
    def ask_many(body: AskManyIn, user: str = User):
        """`/ask` for up to 256 questions at once, scored in batches: one answer per question, in order."""
        return [a.to_dict() for a in mem.ask_many(body.questions, k=body.k, user=user)]

    async def no_body(request: Request, user: str = User) -> None:  # (the key first: a stranger gets 401)
        """POST /train's option is in its query: a body that says something ({"full": true}) is
        refused, not ignored; an empty one ({} or null, as many clients send) is none."""
        raw = (await request.body()).strip()
        try:
            empty = not raw or json.loads(raw) in ({}, None)
        except ValueError:
            empty = False
        if not empty:
            raise InvalidInput("POST /train takes no request body: to retrain from scratch, use POST /train?full=true")

    @app.post("/train", status_code=202, response_model=TrainJobOut, response_model_exclude_unset=True,
              responses=_err(401, 409, 422), tags=["training"], dependencies=[Depends(no_body)])
    def train(request: Request, user: str = User,
              full: bool = Query(False, description="Retrain from scratch instead of folding new or changed "
                                                    "memories into the current adapter.")):
        """Start training a new index version in the background; poll GET /train/{job_id}.
        Recall keeps answering from the previous version until the new one is complete."""
        if not mem.list(user=user, limit=1):  # (not status(): a damaged index is the job's error to report)
            raise TrainingError(f"namespace {user!r} has no memories to train on: add or import some first")
        job = trainer.submit(user, full)
        return JSONResponse(TrainJobOut(**job.to_dict()).model_dump(exclude_unset=True), status_code=202,
                            headers={"Location": str(request.url_for("train_job", job_id=job.id).path)})

    @app.get("/train/{job_id}", response_model=TrainJobOut, response_model_exclude_unset=True,
             responses=_err(401, 404), tags=["training"], name="train_job")
    def train_job(job_id: str, user: str = User):
        job = trainer.get(job_id, user)
        if job is None:
            raise NotFound(f"no training job {job_id!r} for this namespace (jobs live in the server's memory: the "
                           f"last {MAX_FINISHED_JOBS} finished ones, until it restarts; GET /status shows the index version)")
        return TrainJobOut(**job)

    @app.get("/status", response_model=StatusOut, responses=auth_errors, tags=["server"])
    def status(user: str = User):
        """How many memories, how many indexed, which index version."""
        return mem.status(user) | {"training_job": trainer.active(user)}

    @app.get("/log", response_model=list[EventOut], responses=_err(401, 422), tags=["server"])
    def events(limit: int = Query(50, ge=1, le=10000, description="The last N events."), user: str = User):
        """The namespace's event log (add, update, import, forget, train, ask), oldest first."""
        return [e.to_dict() for e in mem.log(user=user, limit=limit)]

    return app


def serve(mem: IPM, api_keys: dict[str, str], host: str = "127.0.0.1", port: int = 8000,
          train_after: float = 0) -> None:
    """Run the server with uvicorn until interrupted (Ctrl-C) or terminated (SIGTERM). With
    `train_after` (seconds), each key's namespace is trained in the background once its
    memories have not changed for that long (autotrain.py), as a POST /train job."""
    import signal

    import uvicorn

    check_can_listen(host, port)  # a port in use is one clear error, not uvicorn's exit code 3
    app = create_app(mem, api_keys)
    trainer: Trainer = app.state.trainer
    auto = None
    if train_after:
        auto = trainer.watch(sorted(set(api_keys.values())), train_after).start()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the
    # handler it found (uvicorn.run swallows the KeyboardInterrupt of SIGINT). Under the
    # default SIGTERM handler that kills the process before anything below runs; this handler
    # turns it into an exception.
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    except _Terminated:
        pass  # stopped as asked: exit 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if auto is not None:
            auto.stop()
        running = trainer.close()
        # A request cut off at the end of the grace period (StopGuard) leaves its worker thread
        # running, and the interpreter would wait for it at exit.
        cut_off = app.state.cut_off
        if running or cut_off:
            # A thread inside the model; ending the interpreter under it can abort the process.
            # Nothing is lost: a version becomes current only once complete, and store writes are
            # transactions.
            if running:
                log.warning("stopped while training %s; the previous index version stays current", ", ".join(running))
            if cut_off:
                log.warning("stopped with %d request(s) still under way (%s), answered 503; not waiting for them",
                            len(cut_off), ", ".join(sorted(set(cut_off))))
            logging.shutdown()
            os._exit(0)


def check_can_listen(host: str, port: int) -> None:
    """InvalidInput where uvicorn could not listen on host:port (the port is in use, the address
    is not this machine's): bound as uvicorn binds it, then let go."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as e:
            raise InvalidInput(f"cannot listen on {host}:{port}: {e.strerror or e}") from None



class _Terminated(Exception):
    """SIGTERM, raised in the main thread once uvicorn has shut down."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # python -m ipm.server --keys FILE [--home DIR] [--host H] [--port P]
    from .cli_server import run_alone
    from .cli_server import serve as _serve_command

    run_alone(_serve_command)
