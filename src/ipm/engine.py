"""The public API: one object over a home directory, mirrored one-to-one by the CLI and server.

    import ipm
    mem = ipm.open("./.ipm")
    mem.add("My dog's name is Max.")          # -> Memory(id="personal_pet_max", ...)
    mem.train()
    mem.ask("what's my dog called?")           # -> Answer(hits=[Hit(id, text, score)], ...)
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from . import index as index_dir
from .config import Config, Paths, read_user_file
from .errors import IndexDamaged, IndexMissing, InvalidInput, IPMWarning, ModelError, NotFound, TrainingError
from .index import QUESTION_EMBEDDINGS, QUESTIONS_FILE, TEXT_EMBEDDINGS
from .model import (LEGACY_PROMPT, PROMPT, RUNNER_MODEL_TYPES, BaseModel, Runner, id_token_ids, int8_available,
                    int8_suits, layer_ranges, load_base, quiet_transformers, resolve_model, wanted_layers)
from .questions import (OFF_TOPIC, Aliases, alias_questions, builtin_questions, content_words, llm_questions,
                        related_words)
from .retrieve import Candidates, load_dense_encoder
from .search import GenerateDecoder, RunnerDecoder, Signals, fuse, rerank
from .store import Memory, NewMemory, Store, check_namespace, check_question, questions_digest, sha256
from .train import Example, calibrate, train_adapter
from .trie import Trie

DEFAULT_USER = "default"
# A listed memory's own fields (`ipm list --json`, GET /memories) an import accepts beside id,
# text and questions, so that a listing imports as it is: the sha256 is checked against the
# text; the others describe the memory where it was listed and are not carried over.
STORED_FIELDS = frozenset({"namespace", "sha256", "version", "created_at", "updated_at"})


@dataclass
class Hit:
    id: str
    text: str
    score: float
    pending: bool = False
    # Hybrid decoding: what the adapter, dense retrieval, BM25 (and the rerank) each said (not in to_dict).
    signals: Signals | None = None

    def to_dict(self) -> dict:
        d = {"id": self.id, "text": self.text, "score": round(self.score, 6)}
        if self.pending:
            d["pending"] = True
        return d


@dataclass
class Answer:
    question: str
    abstained: bool
    hits: list[Hit] = field(default_factory=list)
    # The ranking behind the answer, kept also when abstaining (for evaluation); not shown
    # to users as an answer.
    candidates: list[Hit] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"question": self.question, "abstained": self.abstained, "hits": [h.to_dict() for h in self.hits]}


@dataclass
class ImportResult:
    """What an import stored: memories, training questions (given with them or on their own;
    a question already stored for its memory is not counted) and the new memories' IDs."""

    memories: int = 0
    questions: int = 0
    ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"memories": self.memories, "questions": self.questions, "ids": self.ids}


@dataclass
class _Serving:
    """What answers one namespace: its adapter version, trie, threshold and, for hybrid
    decoding, the retrievers over its indexed memories."""

    version: str | None = None
    adapter: str | None = None
    trie: Trie = field(default_factory=Trie)
    indexed: dict[str, str] = field(default_factory=dict)  # id -> text sha256 at training
    prompt: str = PROMPT  # the template the served version was trained with
    # The store generation up to which forgets are applied to `indexed` (first the one the served
    # version read its memories at); apart from `generation`, which a reconfigure resets.
    forgets_seen: int | None = None
    threshold: float = 0.0
    calibration: dict = field(default_factory=dict)  # the index's abstention calibration, per decoding
    generation: int = -1  # store generation the trie and `pending_words` reflect
    # The content words of each live memory the adapter was not trained on.
    pending_words: dict[str, frozenset[str]] = field(default_factory=dict)
    candidates: Candidates | None = None
    embeddings: dict = field(default_factory=dict)  # text sha256 -> MiniLM embedding, reused across resyncs
    text_embeddings_read: str | None = None  # the version whose kept text embeddings `embeddings` has
    expansion: dict | None = None  # id -> (training questions, their embeddings) of the served version


ASK_BATCH = 16  # questions per forward pass in ask_many (hybrid decoding)
# what kept candidate scores can be ranked again under
FUSION_OPTIONS = ("fusion_adapter", "fusion_dense", "fusion_bm25", "fusion_bm25_floor", "fusion_bm25_noise")
RERANK_OPTIONS = ("rerank_likelihood", "rerank_candidates")
CALIBRATED_OPTIONS = (*FUSION_OPTIONS, "expand_retrievers", "quantize", *RERANK_OPTIONS)  # what a hybrid threshold hangs on
QUERY_OPTIONS = {"decoding", "hybrid_candidates", *CALIBRATED_OPTIONS, "beam_size", "max_k", "abstain_threshold"}
CALIBRATION_QUESTIONS = 300  # held-back questions sampled to calibrate each decoding's threshold
CALIBRATION_FOLDS = 10  # see IPM._calibration_top1


def _bearing(settings: dict) -> dict:
    """Calibrated settings as far as they bear on hybrid scores: with the rerank off, the number
    of candidates it would rerank does not."""
    return settings if settings.get("rerank_likelihood") else {**settings, "rerank_candidates": None}


def _quantize_hint(had: dict | None, now: dict) -> str:
    """", or set quantize = ..." where int8 asks are what differs: serving the other way costs nothing."""
    if had is None or had.get("quantize") == now["quantize"]:
        return ""
    return f", or set quantize = '{had['quantize']}'"


def _calibrations(manifest: dict) -> dict:
    """An index's abstention calibration per decoding ({decoding: {"threshold", ...}})."""
    calibration = manifest["metrics"]["calibration"]
    return {"pure": calibration} if "threshold" in calibration else calibration  # before hybrid decoding


def untrained_ids(manifest: dict | None, hashes: dict[str, str], asked: dict[str, str]) -> set[str]:
    """The IDs (of `hashes`: id -> text sha256) an index's `manifest` was not trained on as they
    are now: added since, text changed since, or, where the manifest records them, user-given
    questions changed since (`asked`: id -> questions_digest, for memories that have any)."""
    if not manifest:
        return set(hashes)
    ids, learned = manifest["ids"], manifest.get("questions")
    out = {mid for mid, digest in hashes.items() if ids.get(mid) != digest}
    if learned is not None:  # an index from before ipm recorded them says nothing of them
        out |= {mid for mid in hashes if mid in ids and asked.get(mid) != learned.get(mid)}
    return out


def _asked(memories: list[Memory]) -> dict[str, str]:
    """questions_digest of each memory that has user-given questions, by ID."""
    return {m.id: questions_digest(m.questions) for m in memories if m.questions}


def _learned(memories: list[Memory], prev: tuple[Path, dict] | None, new_ids: set[str] | None,
             trained_on: list[tuple[str, str]] | None) -> dict[str, str]:
    """The record of user-given questions a new version learned (questions_digest by ID): every
    memory's, unless it continued from a version that kept no record; then a memory it did not
    train again counts only if that version's training questions hold all of its questions (some
    may have been imported after it: the next train learns them)."""
    asked = _asked(memories)
    if prev is None or "questions" in prev[1]:
        return asked
    seen = set(trained_on or ())
    questions = {m.id: m.questions for m in memories}
    return {mid: digest for mid, digest in asked.items()
            if mid in (new_ids or ()) or all((q, mid) in seen for q in questions[mid])}


def read_questions(version_dir: Path) -> list[tuple[str, str]]:
    """An index version's training questions as (question, memory ID) rows, in file order."""
    with (version_dir / QUESTIONS_FILE).open(encoding="utf-8") as f:
        return [(r["question"], r["memory_id"]) for r in map(json.loads, f)]


def group_expansion(rows: list[tuple[str, str]], embeddings, texts: dict[str, str]) -> dict:
    """{memory ID: (its questions, their embedding rows)} for the retrievers' document
    expansion; a memory's own text, which the retrievers match anyway, is left out."""
    import torch

    by_id: dict[str, list[int]] = {}
    for i, (question, mid) in enumerate(rows):
        if question != texts.get(mid):
            by_id.setdefault(mid, []).append(i)
    return {mid: ([rows[i][0] for i in idx], embeddings[torch.tensor(idx)]) for mid, idx in by_id.items()}


def read_records(path: str | Path) -> tuple[object, str]:
    """Load an import file: a JSON document, or JSON lines (returned as [(line, record)])."""
    return decode_records(read_user_file(path, "import file"), str(path))


def decode_records(raw: bytes | str, source: str) -> tuple[object, str]:
    """The records of an import file's content (see `read_records`); `source` names it in errors."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")  # a byte-order mark is the file's encoding, not its text
        except UnicodeDecodeError as e:
            raise InvalidInput(f"{source} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    raw = raw.removeprefix("\ufeff")
    try:
        data = json.loads(raw, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as document:
        whole = document
    except RecursionError:
        raise InvalidInput(f"{source} nests JSON too deeply") from None
    except InvalidInput as e:
        raise InvalidInput(f"{source}: {e}") from None
    except ValueError as e:  # e.g. a number of more than 4,300 digits
        raise InvalidInput(f"{source} is not valid JSON: {e}") from None
    else:
        # One line of JSON lines is one record, not a {"id": "text"} document: "text",
        # "question" and "memory_id" are no valid IDs.
        if isinstance(data, dict) and set(data) & {"text", "question", "memory_id"}:
            return [(1, data)], "lines"
        return data, "json"
    # Split on newlines only: U+2028 and the like may stand unescaped inside a JSON string.
    lines = [(n, line) for n, line in enumerate(raw.split("\n"), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append((n, json.loads(line, object_pairs_hook=unique_keys)))
        except json.JSONDecodeError as e:
            if not records:  # not JSON lines at all: a JSON document, and its own error says where
                raise InvalidInput(f"{source} is not valid JSON: {whole.msg} at line {whole.lineno}, "
                                   f"column {whole.colno}") from None
            raise InvalidInput(f"{source}: line {n} is not valid JSON ({e.msg})") from None
        except InvalidInput as e:
            raise InvalidInput(f"{source}: line {n}: {e}") from None
        except RecursionError:
            raise InvalidInput(f"{source}: line {n} nests JSON too deeply") from None
        except ValueError as e:
            raise InvalidInput(f"{source}: line {n} is not valid JSON ({e})") from None
    return records, "lines"


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refused if it names a key twice (json.loads would keep the last silently:
    in a {"id": "text"} file, one memory lost)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInput(f"key {key!r} is given twice in one object")
        out[key] = value
    return out


def labelled_records(data, kind: str = "json") -> list[tuple[str, object]] | None:
    """Decoded records (`decode_records`) with the label that names each in an error: "line 3"
    (JSON lines), "index 2" (a JSON list), "key 'x'" (an object's items, as (key, value)); None
    for any other JSON value."""
    if kind == "lines":
        return [(f"line {n}", rec) for n, rec in data]
    if isinstance(data, dict):
        return [(f"key {key!r}", (key, value)) for key, value in data.items()]
    if isinstance(data, list):
        return [(f"index {i}", rec) for i, rec in enumerate(data)]
    return None


def parse_records(data, source: str, kind: str = "json") -> tuple[list[NewMemory], list[str], list[tuple[str, str]], list[str]]:
    """Validate import records. Accepted shapes:
    - `{"id": "text", ...}` (memories keyed by ID);
    - a list (JSON, or JSON lines when kind="lines") of `{"id"?, "text", "questions"?}` (memories);
    - a list of `{"question", "memory_id"}` (training questions for existing memories).
    Returns (memories, their labels, questions, their labels), a label naming where the record
    is ("line 3", "index 2", "key 'x'"); raises InvalidInput naming the bad record."""
    records = labelled_records(data, kind)
    if records is None:
        raise InvalidInput(f"{source}: expected a JSON object, a JSON list or JSON lines")
    if not records:
        raise InvalidInput(f"{source} holds no records")
    memories: list[NewMemory] = []
    questions: list[tuple[str, str]] = []
    mem_labels: list[str] = []
    q_labels: list[str] = []
    for label, rec in records:
        if isinstance(data, dict):  # {"id": "text"}: (key, value) pairs
            rec = {"id": rec[0], "text": rec[1]}
        try:
            if not isinstance(rec, dict):
                raise InvalidInput("expected an object")
            if "question" in rec and "memory_id" in rec and "text" not in rec:
                unknown = set(rec) - {"question", "memory_id"}
                if unknown:
                    raise InvalidInput(f"unknown field(s) {sorted(unknown)}")
                if not isinstance(rec["memory_id"], str):
                    raise InvalidInput("memory_id must be a string")
                questions.append((rec["memory_id"], check_question(rec["question"])))
                q_labels.append(f"{source}: {label}")
            elif "text" in rec:
                unknown = set(rec) - {"id", "text", "questions"} - STORED_FIELDS
                if unknown:
                    raise InvalidInput(f"unknown field(s) {sorted(unknown)}")
                if "sha256" in rec:
                    _check_listed_hash(rec["sha256"], rec["text"])
                qs = rec.get("questions") or []
                if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
                    raise InvalidInput("questions must be a list of strings")
                memories.append(NewMemory(rec["text"], rec.get("id"), qs))
                mem_labels.append(f"{source}: {label}")
            else:
                raise InvalidInput("a record needs 'text' (a memory) or 'question' and 'memory_id'")
        except InvalidInput as e:
            raise InvalidInput(f"{source}: {label}: {e}") from None
    return memories, mem_labels, questions, q_labels


def json_safe(x):
    """`x` with NaN and infinities (a diverged loss) as None: they are not JSON. For what the CLI
    and the server print."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _model_source(base_model: str | None) -> str | None:
    """The configured base model as the manifest records it: a local path made absolute, so an
    index trained with `--base-model ./model` is served from any working directory."""
    return None if base_model is None else str(Path(base_model).expanduser().absolute())


def _check_listed_hash(digest, text) -> None:
    """A listed memory's sha256 must be that of its text (a text edited since is refused)."""
    if not isinstance(digest, str):
        raise InvalidInput("sha256 must be a string (the hex digest a listing gives)")
    try:
        actual = sha256(text) if isinstance(text, str) else None
    except UnicodeEncodeError:  # a lone surrogate: the store refuses the text itself, with its reason
        actual = None
    if actual is not None and digest != actual:
        raise InvalidInput("its sha256 is not that of its text: the text was changed or damaged since it was "
                           "listed; correct it, or drop the sha256 to import the text as it is")


class IPM:
    """Memories, their index and recall, over one home directory. Thread-safe."""

    def __init__(self, home: str | Path | None = None, config: Config | None = None, cache: str | Path | None = None):
        self.paths = Paths.at(home, cache)
        if config is None:
            config = Config.from_file(self.paths.config_file) if self.paths.config_file.is_file() else Config()
        self.config = config
        self.store = Store(self.paths.db, config.max_text_bytes, config.id_scheme)
        self._serving: dict[str, _Serving] = {}
        self._lock = threading.RLock()
        self._base: BaseModel | None = None
        self._model = None  # PEFT model holding every namespace's adapter (serving only)
        self._decoder = None

    # -- memories ----------------------------------------------------------------------
    def add(self, text: str, id: str | None = None, questions: Iterable[str] = (), user: str = DEFAULT_USER) -> Memory:
        return self.store.add(user, text, id, questions)

    def import_(self, path: str | Path, user: str = DEFAULT_USER) -> ImportResult:
        """Import memories or training questions from a file (see `parse_records`): all or nothing."""
        data, kind = read_records(path)
        return self.import_records(data, user, source=str(path), kind=kind)

    def import_text(self, raw: bytes | str, user: str = DEFAULT_USER, source: str = "request body") -> ImportResult:
        """Import the content of an import file (a JSON document or JSON lines), as `import_` does."""
        data, kind = decode_records(raw, source)
        return self.import_records(data, user, source=source, kind=kind)

    def import_records(self, data, user: str = DEFAULT_USER, source: str = "request", kind: str = "json") -> ImportResult:
        """Import already-parsed records (a dict or a list, as in an import file): all or nothing."""
        memories, mem_labels, questions, q_labels = parse_records(data, source, kind)
        check_namespace(user)
        result = ImportResult()
        if memories and questions:
            raise InvalidInput(f"{source}: mixes memories and questions; import them separately")
        if memories:
            added = self.store.add_many(user, memories, source="import", labels=mem_labels)
            result.memories, result.ids = len(added), [m.id for m in added]
            result.questions = sum(len(m.questions) for m in added)  # given with the memories, each once
        if questions:
            result.questions = self.store.add_questions(user, questions, labels=q_labels)
        return result

    def update(self, id: str, text: str, user: str = DEFAULT_USER) -> Memory:
        return self.store.update(user, id, text)

    def get(self, id: str, user: str = DEFAULT_USER) -> Memory:
        return self.store.get(user, id)

    def list(self, user: str = DEFAULT_USER, limit: int | None = None, offset: int = 0) -> list[Memory]:
        """The namespace's memories, oldest first; `limit` and `offset` page through them."""
        return self.store.list(user, limit=limit, offset=offset)

    def memories_in_order(self, user: str = DEFAULT_USER) -> list[Memory]:
        """The namespace's memories in the order training, the retrievers and the baselines
        read them: oldest first, those added at once by ID. Not the listing's order (one import
        in the file's order): an index must not hang on the order of an import file's lines."""
        return sorted(self.store.list(user), key=lambda m: (m.created_at, m.id))

    def history(self, id: str, user: str = DEFAULT_USER) -> list[dict]:
        return self.store.history(user, id)

    def forget(self, id: str, user: str = DEFAULT_USER) -> None:
        """Erase a memory. Its ID leaves the decoder's trie before this returns, and its text
        and training questions leave the store and every index version on disk (index.purge)."""
        root = self.paths.index_root(check_namespace(user))
        try:
            self.get(id, user=user)  # NotFound before anything is written
        except NotFound:
            # A forget killed after the store let the memory go, before its purge was done: asked
            # again, it finishes that purge (below) instead of saying there is nothing to forget.
            if id not in index_dir.pending_forgets(root):
                raise
        else:
            self._forget_in_store(root, id, user)
        # File I/O over every version: under the index lock only, so asks are not held up by it.
        try:
            index_dir.purge(root, lambda: set(self.store.ids(user)), frozenset({id}), self._forgotten_since(user))
        except IndexDamaged as e:
            raise IndexDamaged(f"{id!r} is forgotten from the store (it is never answered again), but not yet "
                               f"from every index file: {e}") from None

    def _forget_in_store(self, root: Path, id: str, user: str) -> None:
        """The store's part of `forget`, and the served trie's; the index files are purged after it."""
        # Remembered before the store lets it go: a purge cut short (Ctrl-C, a crash) is finished
        # by the next one, even once the ID is added again; a purge meanwhile leaves the memory be
        # until the store has logged its forget (index.purge). Where that note cannot be written (a
        # full disk, a damaged list), the memory is still forgotten: the purge below then fails
        # with an error that says what to do.
        since = self.store.generation(user)
        try:
            noted = index_dir.remember_forgotten(root, id, since)
        except (OSError, IndexDamaged):
            noted = False
        try:
            with self._lock:
                self.store.forget(user, id)
                s = self._serving.get(user)
                if s is not None:
                    s.trie.remove(id)
                    s.indexed.pop(id, None)  # what the index learned of it is of the forgotten text
        except BaseException:
            # Not forgotten after all: its index files stay as they are. Only the note this call
            # wrote is taken back (an earlier forget's, still pending, stays).
            if noted and id in self.store.ids(user):
                index_dir.take_back_note(root, id, since, lambda: id in self.store.forgotten_since(user, since))
            raise

    def _forgotten_since(self, user: str):
        """For index.purge: the IDs the store has logged a forget of after a generation."""
        return lambda generation: self.store.forgotten_since(user, generation)

    def log(self, user: str = DEFAULT_USER, limit: int | None = None):
        return self.store.events(user, limit)

    def untrained(self, user: str = DEFAULT_USER) -> list[str]:
        """The memories the namespace's index was not trained on as they are now (added, or their
        text or user-given questions changed since), sorted: what an incremental `train` learns."""
        try:
            manifest = index_dir.read_manifest(self.paths.index_root(check_namespace(user)))
        except IndexMissing:
            manifest = None
        return sorted(untrained_ids(manifest, self.store.hashes(user), self.store.question_digests(user)))

    def namespaces(self) -> list[str]:
        """The namespaces that hold memories, sorted."""
        return self.store.namespaces()

    def status(self, user: str = DEFAULT_USER) -> dict:
        """Counts of the namespace's memories: in its index, `pending` (added since it was
        trained: found by their words until the next training) and `changed` (in the index, but
        updated since: recalled with their new text, under questions learned from the old; or
        given new training questions since)."""
        hashes = self.store.hashes(user)
        root = self.paths.index_root(check_namespace(user))
        current = index_dir.current_dir(root)
        manifest = None if current is None else index_dir.load_manifest(current)
        if current is not None:
            index_dir.check_adapter(current)  # damage an ask would meet, said here too
        indexed = manifest["ids"] if manifest else {}
        inside = [mid for mid in hashes if mid in indexed]
        return {"user": user, "memories": len(hashes), "indexed": len(inside), "pending": len(hashes) - len(inside),
                "changed": len(untrained_ids(manifest, {mid: hashes[mid] for mid in inside},
                                             self.store.question_digests(user))),
                "index_version": manifest["version"] if manifest else None,
                "base_model": manifest["base_model"]["name"] if manifest else None}

    def reconfigure(self, **overrides) -> Config:
        """Change query-time options (decoding, fusion weights, beam size, threshold) of an open
        engine; the next `ask` uses them. Returns the new config."""
        other = set(overrides) - QUERY_OPTIONS
        if other:
            raise InvalidInput(f"only query-time options can change on an open engine ({', '.join(sorted(QUERY_OPTIONS))}); "
                               f"not {', '.join(sorted(other))}: open it with that config instead")
        with self._lock:
            config = self.config.updated(**overrides)
            if self._base is not None:  # else checked when the base model is loaded
                int8 = self._int8(self._base, config)
                if self._decoder is not None:
                    self._decoder.int8 = int8
            self.config = config
            for s in self._serving.values():
                s.generation = -1  # re-derive threshold and retrievers on the next ask
            return self.config

    # -- model -------------------------------------------------------------------------
    def base(self, base_model: str | None = "config") -> BaseModel:
        """The base model (loaded once per process): the configured one, or `base_model`."""
        cfg = self.config if base_model == "config" else self.config.updated(base_model=base_model)
        return load_base(cfg, self.paths)

    def _index_base(self, base_model: str | None = "config", trained_dtype: str | None = None,
                    layers: list[int] | None | str = "config") -> BaseModel:
        """The base model to train an index on or serve one with (serving passes the
        manifest's base model and kept layers). A dtype set in the config wins. Under "auto":
        the copy this process already serves, if it is the same model (one copy serves every
        namespace, and a retrain matches what it will be served with); else, for an index
        trained in float32, float32, since its abstention threshold was calibrated on float32
        scores. An index trained in bf16 is served in "auto"'s choice: bf16 where the device
        computes in it natively, else float32 rather than slow emulated bf16."""
        cfg = self.config if base_model == "config" else self.config.updated(base_model=base_model)
        if cfg.dtype == "auto":
            if self._base is not None:
                _, path, digest = resolve_model(cfg, self.paths)
                if self._base.sha256 == digest and self._base.layers == wanted_layers(cfg, path, layers):
                    return self._base
            if trained_dtype == "float32":
                cfg = cfg.updated(dtype="float32")
        return load_base(cfg, self.paths, layers)

    # -- training ----------------------------------------------------------------------
    def training_examples(self, user: str, base: BaseModel | None = None,
                          progress: Callable[[int, int], None] | None = None,
                          ids: set[str] | None = None) -> tuple[list[Example], list[Example]]:
        """(train, calibration) examples for every memory of `user` (or those in `ids`). Made
        from the memories and user-given questions only; the calibration share is generated
        questions held back."""
        cfg = self.config
        everything = self.memories_in_order(user)
        memories = [m for m in everything if ids is None or m.id in ids]
        # who is who is read from every memory, also when training on some of them only
        builtin = cfg.question_source != "llm"
        aliases = Aliases(m.text for m in everything) if builtin and "aliases" in cfg.question_kinds else None
        kinds = [k for k in cfg.question_kinds if k != "aliases"]
        related = None
        if builtin and "related" in cfg.question_kinds:
            try:
                related = related_words(load_dense_encoder(), self.paths.cache)
            except ModelError as e:
                raise ModelError(f"question kind 'related' needs the dense model: {e}") from None
        extra: dict[str, list[str]] = {}
        if cfg.question_source in ("llm", "both"):
            if base is None:
                raise TrainingError("LLM question generation needs the base model")
            done = [0]

            def tick(n):
                done[0] += n
                if progress:
                    progress(done[0], len(memories))
            extra = llm_questions(base, [(m.id, m.text) for m in memories], cfg.llm_questions_per_memory,
                                  cfg.seed, progress=tick)
        rng = random.Random(cfg.seed)
        train, calib = [], []
        for m in memories:
            generated = builtin_questions(m.id, m.text, cfg.questions_per_memory, cfg.seed, kinds,
                                          related)[1:] if builtin else []
            generated += extra.get(m.id, [])
            rng.shuffle(generated)
            n_cal = int(len(generated) * cfg.calibration_fraction)
            calib += [Example(q, m.id) for q in generated[:n_cal]]
            inputs = list(dict.fromkeys([m.text] + m.questions + generated[n_cal:]))
            # Alias questions are made from the training share only (one made from a held-back
            # question would be its near-duplicate) and drawn apart, so the split above is the
            # same with the kind as without.
            if aliases is not None:
                inputs += alias_questions(m.id, m.text, inputs, aliases, cfg.seed)
            train += [Example(q, m.id) for q in inputs]
        return train, calib

    def _with_negatives(self, examples: list[Example], candidates: Candidates, chunk: int = 512) -> list[Example]:
        """The examples, each with the other IDs the retrievers propose for its question."""
        out = []
        for b in range(0, len(examples), chunk):
            part = examples[b:b + chunk]
            for e, proposed in zip(part, candidates.many([e.question for e in part], self.config.hard_negatives)):
                out.append(replace(e, negatives=tuple(mid for mid in proposed if mid != e.memory_id)))
        return out

    def _incremental_from(self, user: str, base: BaseModel) -> tuple[tuple[Path, dict] | None, str | None]:
        """The current version and its manifest, if a new one can continue from its adapter;
        else None and why not (None where there is no index yet)."""
        root = self.paths.index_root(user)
        try:  # a current version that cannot be read is made again in full, not continued
            prev = index_dir.current_dir(root)
            if prev is None:
                return None, None
            manifest = index_dir.load_manifest(prev)
            index_dir.check_adapter(prev)
        except IndexDamaged as e:
            return None, f"the current index cannot be read ({index_dir.without_advice(e)})"
        had = manifest["base_model"]
        layers = list(base.layers) if base.layers else None
        changed = [k for k in ("lora_r", "lora_alpha", "lora_layers", "target_modules")
                   if manifest["config"].get(k) != getattr(self.config, k)]
        if had["sha256"] != base.sha256:
            why = f"the current index was trained on another base model ({had['name']})"
        elif had.get("layers") != layers:
            why = (f"the current index was trained on base layers {layer_ranges(had['layers']) if had.get('layers') else 'all'}, "
                   f"this configuration keeps {layer_ranges(layers) if layers else 'all'} (base_layers)")
        elif changed:
            why = "the LoRA shape changed (" + ", ".join(f"{k} {manifest['config'].get(k)} -> {getattr(self.config, k)}"
                                                       for k in changed) + ")"
        elif manifest.get("prompt", LEGACY_PROMPT) != PROMPT:
            why = "the current index was trained with an earlier prompt format"
        elif not (prev / QUESTIONS_FILE).is_file():
            why = "the current index kept no training questions to replay"
        else:
            return (prev, manifest), None
        return None, why

    def train(self, user: str = DEFAULT_USER, progress: Callable[[str, int, int, float | None], None] | None = None,
              full: bool = False) -> dict:
        """Train a new index version for `user` and make it current; returns its manifest.

        Incremental by default: when an index exists (same base model and LoRA shape), the new
        adapter continues from it, trained on the questions of new or changed memories plus a
        replayed sample (`replay_ratio`) of the questions the current adapter was trained on.
        If nothing is new, the current manifest is returned with `"up_to_date": true`, unless
        it lacks a decoding's calibration that is now asked for (then it is trained again in full).
        `full=True` retrains from scratch on every memory. The decodings calibrated are the
        configured one, `also_calibrate`'s, and those the current index was calibrated for.

        `progress(phase, done, total, loss)` is called with phase "questions", "embed" (the
        retrievers' question embeddings), "train" and "calibrate". The previous version keeps
        serving until the new one is complete. One training of a namespace at a time: another
        one under way (in any process) is a TrainingError."""
        check_namespace(user)
        if not self.store.count(user):  # said before the lock makes the namespace's index directory
            raise TrainingError(f"namespace {user!r} has no memories to train on: add or import some first")
        with index_dir.training(self.paths.index_root(user), user):
            return self._train(user, progress, full)

    def _train(self, user: str, progress: Callable[[str, int, int, float | None], None] | None, full: bool) -> dict:
        # Finish any purge a forget could not (index.purge), before anything else.
        index_dir.purge(self.paths.index_root(user), lambda: set(self.store.ids(user)),
                        forgotten_since=self._forgotten_since(user))
        snapshot = self.store.generation(user)  # a memory forgotten after this is purged from the new version
        memories = self.memories_in_order(user)
        if not memories:
            raise TrainingError(f"namespace {user!r} has no memories to train on: add or import some first")
        t0 = time.perf_counter()
        with self._lock:  # as recall loads it: two threads loading it at once would leave two copies
            base = self._index_base()
        self._int8(base, self.config)  # refused now, not after training, where calibration would use it
        self._check_trainable(base)  # now, not after minutes of writing questions
        prev, full_because = (None, None) if full else self._incremental_from(user, base)
        if prev is not None:
            current_manifest = prev[1]
        else:
            try:
                current = index_dir.current_dir(self.paths.index_root(user))
                current_manifest = index_dir.load_manifest(current) if current else None
            except IndexDamaged:  # replaced by this train
                current_manifest = None
        had = set(_calibrations(current_manifest)) if current_manifest else set()
        wanted = self._decodings_to_calibrate() | had
        new_ids = untrained_ids(prev[1], {m.id: m.sha256 for m in memories}, _asked(memories)) if prev else None
        if prev is not None and wanted - had and not new_ids:
            # Nothing new to train on, but a calibration is missing: the adapter is trained again
            # in full (the calibration questions are drawn anew with the training split).
            prev, full_because = None, f"{' and '.join(sorted(wanted - had))} decoding was not calibrated"
        on_questions = lambda d, t: progress and progress("questions", d, t, None)  # noqa: E731
        incremental = None
        known: list[Example] = []  # questions of earlier versions still valid, kept for later replays
        trained_on = None  # the current version's training questions, when continuing from it
        if prev is None:
            train, calib = self.training_examples(user, base, on_questions)
        else:
            prev_dir, prev_manifest = prev
            if not new_ids:
                return {**prev_manifest, "up_to_date": True}
            train, calib = self.training_examples(user, base, on_questions, ids=new_ids)
            kept = {m.id for m in memories} - new_ids
            trained_on = read_questions(prev_dir)
            old = [Example(q, mid) for q, mid in trained_on if mid in kept]
            rng = random.Random(self.config.seed)
            replay = rng.sample(old, min(len(old), int(self.config.replay_ratio * len(train))))
            # Old memories are in the calibration set too, with the questions no adapter of theirs
            # was trained on: made again (the built-in generator is deterministic) less those the
            # earlier versions trained on. Questions from the LLM are not made again (too slow):
            # there, their texts stand in (the adapter has seen those).
            if self.config.question_source == "builtin":
                seen = set(trained_on)
                again = self.training_examples(user, base, ids=set(rng.sample(sorted(kept), min(len(kept), len(calib)))))
                old_held = [ex for ex in again[0] + again[1] if (ex.question, ex.memory_id) not in seen]
            else:
                old_held = [Example(m.text, m.id) for m in memories if m.id in kept]
            calib += rng.sample(old_held, min(len(old_held), len(calib)))
            incremental = {"from_version": prev_dir.name, "new_memories": len(new_ids),
                           "new_examples": len(train), "replayed_examples": len(replay)}
            known = old
            train = train + replay
        phases: dict[str, float] = {}  # seconds per phase, for the manifest

        def lap(phase: str) -> None:
            phases[phase] = time.perf_counter() - t0 - sum(phases.values())
        lap("questions")
        # The training questions this version keeps (and replays from later); the retrievers
        # also match them when expand_retrievers is on. Calibration questions stay out of both.
        rows = list(dict.fromkeys((e.question, e.memory_id) for e in train + known))
        # Hybrid decoding's retrievers (where the dense model is installed): they propose the
        # hard negatives, and calibration scores hybrid decoding through them.
        q_emb = expansion = None
        text_emb: dict = {}  # the memories' text embeddings, shared by calibration's retrievers
        try:
            if prev:  # those the version this one continues from kept are not encoded again
                text_emb.update(self._read_text_embeddings(prev[0]))
            if self.config.expand_retrievers:
                q_emb = self._embed_questions(rows, prev[0] if prev else None, progress, trained_on)
                expansion = group_expansion(rows, q_emb, {m.id: m.text for m in memories})
            candidates = self._candidates(memories, text_emb, expansion=expansion)
        except ModelError:  # no dense model: only hybrid decoding and hard negatives need the retrievers
            if "hybrid" in self._decodings_to_calibrate() or self.config.hard_negatives:
                raise
            candidates = None
        if self.config.hard_negatives:
            train = self._with_negatives(train, candidates)
        lap("retrievers")
        result = train_adapter(base, train, self.config, lambda s, t, l: progress and progress("train", s, t, l),
                               init_from=prev[0] if prev else None)
        lap("train")
        trie = Trie((m.id, id_token_ids(base.tokenizer, m.id)) for m in memories)
        decoder = self._make_decoder(base, result.model, pack_weights=False)  # batched: see Runner._packed_weight
        # Calibrate the abstention threshold of the decoding that will serve this index, and
        # of any other that may (Config.also_calibrate): each costs its share of indexing time.
        modes = {mode: proposer for mode, proposer in (("pure", None), ("hybrid", candidates))
                 if mode in wanted and not (mode == "hybrid" and candidates is None)}  # (kept from the last index only)
        cal = random.Random(self.config.seed).sample(calib, min(len(calib), CALIBRATION_QUESTIONS))
        calibration, done = {}, [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress:
                progress("calibrate", done[0], (len(cal) + len(OFF_TOPIC)) * len(modes), None)
        for mode, proposer in modes.items():
            started = time.perf_counter()
            folds = CALIBRATION_FOLDS if mode == "hybrid" and expansion else 0
            top1, folds = self._calibration_top1(decoder, trie, cal, memories, proposer, text_emb, expansion, folds, tick)
            off = [p for _, p in self._top1(decoder, OFF_TOPIC, trie, proposer, tick)]
            calibration[mode] = calibrate(top1, off)
            calibration[mode]["seconds"] = round(time.perf_counter() - started, 2)
            calibration[mode]["quantize"] = self._quantize_resolved(base)  # what scored it
            if mode == "hybrid":  # the threshold holds for these settings only
                calibration[mode]["fusion"] = self._calibrated_settings(base)
                calibration[mode]["expansion_folds"] = folds
        lap("calibrate")
        for mode in sorted(calibration):  # each decoding calibrated, also_calibrate's too
            self._warn_if_abstention_is_off(user, mode, calibration[mode], len(memories))
        root = self.paths.index_root(user)
        name, tmp = index_dir.new_version(root)
        try:
            result.model.save_pretrained(tmp)
            (tmp / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate model card
            with (tmp / QUESTIONS_FILE).open("w", encoding="utf-8") as f:
                for question, mid in rows:
                    f.write(json.dumps({"question": question, "memory_id": mid}, ensure_ascii=False) + "\n")
            if q_emb is not None:
                from safetensors.torch import save_file

                save_file({"embeddings": q_emb.contiguous()}, str(tmp / QUESTION_EMBEDDINGS),
                          metadata={"encoder": load_dense_encoder().fingerprint})
            if candidates is not None:
                index_dir.save_text_embeddings(tmp / TEXT_EMBEDDINGS, [(m.id, m.sha256, text_emb[m.sha256])
                                                                       for m in memories],
                                               load_dense_encoder().fingerprint)
            manifest = {
                "format": 1, "namespace": user, "version": name,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "base_model": {"name": base.name, "source": _model_source(self.config.base_model), "sha256": base.sha256,
                               "layers": list(base.layers) if base.layers else None},
                "ids": {m.id: m.sha256 for m in memories},
                "questions": _learned(memories, prev, new_ids, trained_on),  # (untrained_ids)
                "store_generation": snapshot,  # its memories as the store held them then
                "prompt": PROMPT,
                "threshold": calibration[self.config.decoding]["threshold"],
                "config": self.config.to_dict(),
                "metrics": {**result.metrics, "dtype": str(next(base.model.parameters()).dtype).removeprefix("torch."),
                            "calibration": calibration, "incremental": incremental, "full_because": full_because,
                            "total_seconds": round(time.perf_counter() - t0, 2),
                            "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
                            "memories": len(memories), "calibration_examples": len(calib)},
            }
            # A memory forgotten while this version trained is purged from it before it is
            # made current, under the lock a forget's purge takes: a forget either comes first
            # (the store no longer has the memory) or finds this version in place. One forgotten
            # and added again meanwhile goes too: this version learned its old text.
            with self._lock, index_dir.locked(root):
                live = set(self.store.ids(user)) - self.store.forgotten_since(user, snapshot)
                index_dir.purge_version(tmp, live)
                manifest["ids"] = {k: v for k, v in manifest["ids"].items() if k in live}
                manifest["questions"] = {k: v for k, v in manifest["questions"].items() if k in live}
                # kept, whatever its age: others may be reading it (none where it is damaged: replaced now)
                replaced = index_dir.current_dir(root, strict=False)
                final = index_dir.commit_version(root, name, tmp, manifest)
                retired = index_dir.retire(root, self.config.keep_versions, also_keep=replaced)
        except BaseException:
            index_dir.abandon(tmp)
            raise
        try:
            self.store.log(user, "train", list(manifest["ids"]),  # (less any forgotten while it trained)
                           version=name, examples=len(train),
                           seconds=manifest["metrics"]["total_seconds"],
                           path=final.relative_to(self.paths.home).as_posix(),  # holds if the home moves
                           removed_versions=list(retired))
        finally:
            index_dir.delete_retired(retired)  # outside the locks: asks go on meanwhile
        return manifest

    def _top1(self, decoder, questions: list[str], trie: Trie, candidates: Candidates | None,
              tick: Callable[[int], None]) -> list[tuple[str | None, float]]:
        """(best ID, its probability) for each question, in batches."""
        out = []
        for b in range(0, len(questions), ASK_BATCH):
            chunk = questions[b:b + ASK_BATCH]
            out += [(hits[0][0], hits[0][1]) if hits else (None, 0.0)
                    for hits in self._rank_many(decoder, chunk, trie, candidates, k=1, prompt=PROMPT)]  # a new index
            tick(len(chunk))
        return out

    def _calibration_top1(self, decoder, trie: Trie, cal: list[Example], memories: list[Memory],
                          candidates: Candidates | None, text_emb: dict, expansion: dict | None, folds: int,
                          tick: Callable[[int], None]) -> tuple[list[tuple[float, bool]], int]:
        """(top probability, right) for each held-back question, and the number of folds used
        (at most `folds`, one a memory at least). A held-back question has
        near-duplicates among its memory's training questions (the templates phrase one
        question several ways), and retrievers that match those questions make it far surer
        than a question worded as people ask. With `folds`, its memory's training questions are
        taken out of the retrievers while it is asked: the calibration memories are split into
        `folds` groups and each group is asked of retrievers without that group's questions."""
        mids = sorted({ex.memory_id for ex in cal})
        folds = min(folds, len(mids))
        if not folds:
            return [(p, mid == ex.memory_id) for ex, (mid, p)
                    in zip(cal, self._top1(decoder, [ex.question for ex in cal], trie, candidates, tick))], 0
        random.Random(self.config.seed).shuffle(mids)
        fold = {mid: i % folds for i, mid in enumerate(mids)}
        top1: list = [None] * len(cal)
        for f in range(folds):
            idx = [i for i, ex in enumerate(cal) if fold[ex.memory_id] == f]
            without = self._candidates(memories, text_emb, {mid: e for mid, e in expansion.items() if fold.get(mid) != f})
            for i, (mid, p) in zip(idx, self._top1(decoder, [cal[i].question for i in idx], trie, without, tick)):
                top1[i] = (p, mid == cal[i].memory_id)
        return top1, folds

    # -- recall ------------------------------------------------------------------------
    def _make_decoder(self, base: BaseModel, model, pack_weights: bool = True):
        int8 = self._int8(base, self.config)  # (refused for a model without a Runner)
        runner = base.runner(model, pack_weights)
        if runner is not None:
            return RunnerDecoder(runner, base.tokenizer, base.device, int8=int8, model=model)
        return GenerateDecoder(model, base.tokenizer, base.device)

    @staticmethod
    def _int8(base: BaseModel, config: Config) -> bool:
        """Whether to ask with int8 linear maps (Config.quantize): with "auto" where they suit
        this machine and model; with "int8", a clear error where they cannot run."""
        if config.quantize == "none":
            return False
        if config.quantize == "auto":
            return int8_suits(base)
        if not Runner.supports(base.model):
            raise ModelError(f"quantize = 'int8' needs a Llama-family base model ({', '.join(RUNNER_MODEL_TYPES)}); "
                             f"{base.label} is not one: set quantize = 'none'")
        if base.device != "cpu" or not int8_available():
            raise ModelError("quantize = 'int8' runs on a CPU with PyTorch's oneDNN int8 kernels (x86); "
                             f"this is {base.device}" + ("" if base.device != "cpu" else " without them")
                             + ": set quantize = 'none'")
        return True

    def _candidates(self, memories: list[Memory], embeddings: dict | None = None,
                    expansion: dict | None = None) -> Candidates:
        """BM25 and dense retrieval over `memories`, encoding only texts not in `embeddings`;
        with `expansion` (see group_expansion), also over each memory's training questions."""
        import torch

        encoder = load_dense_encoder()
        embeddings = {} if embeddings is None else embeddings
        new = [m for m in memories if m.sha256 not in embeddings]
        if new:
            embeddings.update(zip((m.sha256 for m in new), encoder.encode([m.text for m in new])))
        emb = torch.stack([embeddings[m.sha256] for m in memories])
        questions = q_emb = None
        if expansion is not None:
            none = ([], emb.new_zeros((0, emb.shape[1])))
            questions = [expansion.get(m.id, none)[0] for m in memories]
            q_emb = [expansion.get(m.id, none)[1] for m in memories]
        return Candidates([m.id for m in memories], [m.text for m in memories], encoder, emb, questions, q_emb)

    def _embed_questions(self, rows: list[tuple[str, str]], prev_dir: Path | None = None,
                         progress: Callable | None = None, prev_rows: list[tuple[str, str]] | None = None):
        """MiniLM embeddings (float16) of each (question, memory ID) row, those the version in
        `prev_dir` embedded copied from it (an incremental train embeds only the new ones);
        `prev_rows`: that version's questions, if already read."""
        import torch

        encoder = load_dense_encoder()
        out = torch.zeros((len(rows), encoder.dimension), dtype=torch.float16)
        old = self._read_question_embeddings(prev_dir) if prev_dir is not None else None
        if old is None:
            prev_rows = []
        elif prev_rows is None:
            prev_rows = read_questions(prev_dir)
        if old is not None and len(old) != len(prev_rows):
            old, prev_rows = None, []  # not the file written with those rows: embed everything
        where = {r: i for i, r in enumerate(prev_rows)}
        missing = []
        for i, r in enumerate(rows):
            if r in where:
                out[i] = old[where[r]]
            else:
                missing.append(i)
        chunk = 512
        for b in range(0, len(missing), chunk):
            part = missing[b:b + chunk]
            out[torch.tensor(part)] = encoder.encode([rows[i][0] for i in part]).half().cpu()
            if progress:
                progress("embed", min(b + chunk, len(missing)), len(missing), None)
        return out

    @staticmethod
    def _read_question_embeddings(version_dir: Path):
        """A version's question embeddings, or None where it kept none (or another encoder made them)."""
        from safetensors import safe_open

        path = version_dir / QUESTION_EMBEDDINGS
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("encoder") != load_dense_encoder().fingerprint:
                return None
            return f.get_tensor("embeddings")

    @staticmethod
    def _read_text_embeddings(version_dir: Path) -> dict:
        """{text sha256: embedding} of the texts a version kept embeddings of (see
        index.TEXT_EMBEDDINGS); empty where it kept none (an older index), the file cannot be
        read, or another encoder made them: the texts are encoded again."""
        path = version_dir / TEXT_EMBEDDINGS
        kept = index_dir.read_text_embeddings(path) if path.is_file() else None
        if kept is None or kept[0] != load_dense_encoder().fingerprint:
            return {}
        return {sha: e for _, sha, e in kept[1]}

    def _load_expansion(self, version_dir: Path, texts: dict[str, str]) -> dict:
        """The served version's training questions and their embeddings, by memory ID (an index
        that kept no embeddings has them computed once here); `texts`: the memories' texts."""
        rows = read_questions(version_dir) if (version_dir / QUESTIONS_FILE).is_file() else []
        emb = self._read_question_embeddings(version_dir)
        if emb is None or len(emb) != len(rows):
            emb = self._embed_questions(rows)
        return group_expansion(rows, emb, texts)

    def _rank_many(self, decoder, questions: list[str], trie: Trie, candidates: Candidates | None,
                   k: int, *, prompt: str) -> list[list[tuple[str, float, Signals | None]]]:
        """The top-k (id, score, signals) of each question under the configured decoding (see
        Config.decoding); hybrid decoding scores them in batched forward passes. `prompt`: the
        template the index was trained with (its manifest's)."""
        cfg = self.config
        if candidates is None:
            return [[(mid, p, None) for mid, p in decoder.search(q, trie, k=k, beam_size=max(k, cfg.beam_size),
                                                                  prompt=prompt)]
                    for q in questions]
        proposed = [{mid: v for mid, v in c.items() if mid in trie} for c in candidates.many(questions, cfg.hybrid_candidates)]
        subs = [Trie((mid, trie.sequences[mid]) for mid in p) for p in proposed]
        out = []
        for b in range(0, len(questions), ASK_BATCH):
            # every candidate's exact probability, for a batch of questions per forward pass
            scored = decoder.score_many(list(zip(questions[b:b + ASK_BATCH], subs[b:b + ASK_BATCH])), prompt)
            batch = []
            for lora, prop in zip(scored, proposed[b:b + ASK_BATCH]):
                signals = {mid: Signals(math.log(max(lora.get(mid, 0.0), 1e-30)), cos, bm)
                           for mid, (cos, bm) in prop.items()}
                batch.append((signals, fuse(signals, cfg.fusion_dense, cfg.fusion_bm25, cfg.fusion_adapter,
                                            cfg.fusion_bm25_floor, cfg.fusion_bm25_noise)))
            if cfg.rerank_likelihood > 0:
                batch = self._reranked(decoder, questions[b:b + ASK_BATCH], batch, candidates)
            out += [[(mid, p, signals[mid]) for mid, p in fused[:k]] for signals, fused in batch]
        return out

    def _reranked(self, decoder, questions: list[str], batch: list[tuple[dict, list]],
                  candidates: Candidates) -> list[tuple[dict, list]]:
        """Each question's best `rerank_candidates` fused candidates ranked again by the base
        model's likelihood of the question given their texts (search.rerank), in one pass."""
        cfg = self.config
        pairs = [(q, mid) for q, (_, fused) in zip(questions, batch) for mid, _ in fused[:cfg.rerank_candidates]]
        scores = iter(decoder.likelihood([(q, candidates.texts[mid]) for q, mid in pairs]))
        out = []
        for signals, fused in batch:
            likelihood = {mid: next(scores) for mid, _ in fused[:cfg.rerank_candidates]}
            signals = {mid: replace(s, likelihood=likelihood.get(mid)) for mid, s in signals.items()}
            out.append((signals, rerank(fused, likelihood, cfg.rerank_likelihood)))
        return out

    def _warn_if_abstention_is_off(self, user: str, decoding: str, calibration: dict, n_memories: int) -> None:
        """Say so where the calibrated threshold refuses nothing: every question is answered."""
        if self.config.abstain_threshold is not None or calibration["threshold"] > 0 or calibration.get("off_topic_refused"):
            return  # (a threshold set by hand is not the calibrated one)
        if not calibration.get("n_in_scope"):
            cfg = self.config
            setting = "llm_questions_per_memory" if cfg.question_source == "llm" else "questions_per_memory"
            why = "no generated question was held back to calibrate it on " + (
                "(calibration_fraction is 0)" if cfg.calibration_fraction == 0 else
                f"(one is held back for each {math.ceil(1 / cfg.calibration_fraction)} generated for a memory, and "
                f"fewer were: raise {setting}, {getattr(cfg, setting)} here" + (
                    ", or name more question kinds)" if setting == "questions_per_memory" else ")"))
        elif calibration.get("reason") == "no correct calibration answers":
            why = "the index answered none of its calibration questions right (train longer, or on more questions)"
        elif n_memories == 1:
            why = "with one memory, every question goes to it with probability 1"
        else:
            why = ("no threshold refused an off-topic question without refusing over 5% of the right answers "
                   "(its calibration questions)")
        warnings.warn(f"namespace {user!r}: abstention ({decoding} decoding) will refuse no question: {why}; set "
                      "abstain_threshold to choose a threshold", IPMWarning, stacklevel=3)

    def _check_trainable(self, base: BaseModel) -> None:
        """Settings this base model cannot train under, refused before any work."""
        if self.config.hard_negatives and not Runner.supports(base.model):
            raise TrainingError("hard negatives need the fast training path (Llama, Mistral or Qwen2 models): "
                                "set hard_negatives = 0 for this base model")

    def _decodings_to_calibrate(self) -> set[str]:
        return {self.config.decoding, *self.config.also_calibrate}

    def _quantize_resolved(self, base: BaseModel) -> str:
        """Config.quantize as `base` resolves it, "int8" or "none": "auto" is int8 on one
        machine and not on another, and what a threshold hangs on is what the scores came from."""
        return "int8" if self._int8(base, self.config) else "none"

    def _calibrated_settings(self, base: BaseModel) -> dict:
        """The settings a hybrid threshold hangs on, quantize resolved (_quantize_resolved)."""
        return {**{k: getattr(self.config, k) for k in CALIBRATED_OPTIONS}, "quantize": self._quantize_resolved(base)}

    def _warn_if_calibrated_elsewise(self, user: str, calibration: dict) -> None:
        """Hybrid scores are fused probabilities: a threshold calibrated under other fusion
        settings refuses more or fewer questions than it was chosen to. Say so; never guess."""
        had = calibration.get("fusion")
        if had is not None:
            # recorded before the retrievers matched questions, BM25 noise, int8 asks or the rerank existed
            had = {"expand_retrievers": False, "fusion_bm25_noise": 0.0, "quantize": "none", "rerank_likelihood": 0.0,
                   **had}
        now = self._calibrated_settings(self._base)
        if had is not None and _bearing(had) == _bearing(now):
            return
        if had is None:
            then = ("calibrated under fusion settings it did not record (an index trained before ipm recorded "
                    "them), not under the configured ones")
        else:  # only what differs, or the user has to compare a dozen settings by eye
            differ = [k for k in CALIBRATED_OPTIONS if _bearing(had).get(k) != _bearing(now).get(k)]
            then = (f"calibrated with {', '.join(f'{k} {had.get(k)}' for k in differ)}, but asked with "
                    f"{', '.join(f'{k} {now[k]}' for k in differ)}")
        warnings.warn(f"namespace {user!r}: the abstention threshold of its index was {then}; abstention may refuse "
                      "more or fewer questions than calibrated. To recalibrate under these settings, put them in "
                      "the home's ipm.toml and run `ipm train --full`; or set abstain_threshold"
                      + _quantize_hint(had, now) + ".", IPMWarning, stacklevel=2)

    def _warn_if_pure_calibrated_elsewise(self, user: str, calibration: dict) -> None:
        """Pure decoding's scores hang on int8 asks alone: say so where its threshold came from
        the other setting (recorded since "auto"; older indexes do not say)."""
        had, now = calibration.get("quantize"), self._quantize_resolved(self._base)
        if had is not None and had != now:
            warnings.warn(f"namespace {user!r}: the abstention threshold of its index was calibrated with quantize "
                          f"{had}, not {now}; abstention may refuse more or fewer questions than calibrated. Run "
                          f"`ipm train --full` to recalibrate, set abstain_threshold, or set quantize = '{had}'.",
                          IPMWarning, stacklevel=2)

    def _serve(self, user: str) -> _Serving:
        """The serving state of `user`, refreshed if a new version was trained or memories changed."""
        root = self.paths.index_root(user)
        version_dir = index_dir.current_dir(root)
        s = self._serving.setdefault(user, _Serving())
        if version_dir is not None and version_dir.name != s.version:
            import copy

            from peft import PeftModel  # (not imported for a namespace with no index: seconds saved)

            manifest = index_dir.load_manifest(version_dir)
            index_dir.check_adapter(version_dir)  # before anything served now is let go
            base = self._index_base(manifest["base_model"]["source"], manifest["metrics"].get("dtype"),
                                    manifest["base_model"].get("layers"))
            if base.sha256 != manifest["base_model"]["sha256"]:
                raise ModelError(f"index {version_dir} was trained on a different base model "
                                 f"({manifest['base_model']['name']}); retrain with `ipm train`")
            adapter = f"{user}__{version_dir.name}".replace(".", "_").replace("-", "_")
            if self._model is not None and base is not self._base and not any(
                    o.adapter for u, o in self._serving.items() if u != user):
                # The one namespace served here moved to another base (retrained in this process
                # under another base model or base_layers): serve it on that one instead.
                self._model = self._decoder = None
                s.adapter, s.trie = None, Trie()
            if self._model is None:
                self._int8(base, self.config)  # a clear error before anything is half set up
                self._base = base
                self._model = PeftModel.from_pretrained(copy.deepcopy(base.model), version_dir, adapter_name=adapter)
                self._decoder = self._make_decoder(base, self._model)
            else:
                if base is not self._base:
                    raise ModelError("all namespaces served by one process must use the same base model; "
                                     f"{user!r} was trained on {manifest['base_model']['name']}"
                                     + (f" (layers {layer_ranges(manifest['base_model']['layers'])})"
                                        if manifest["base_model"].get("layers") else "")
                                     + f", this process serves {self._base.label} for other namespaces: serve it "
                                     "from another process, or retrain it on the same base model and layers")
                self._model.load_adapter(version_dir, adapter_name=adapter)
            self._model.set_adapter(adapter)
            if s.adapter:
                self._model.delete_adapter(s.adapter)
            self._model.eval()
            s.version, s.adapter, s.expansion = version_dir.name, adapter, None
            s.indexed = dict(manifest["ids"])
            s.prompt = manifest.get("prompt", LEGACY_PROMPT)
            s.forgets_seen = manifest.get("store_generation")
            s.calibration = _calibrations(manifest)
            s.generation = -1
        gen = self.store.generation(user)
        if s.generation != gen and s.version is not None:
            calibrated = s.calibration.get(self.config.decoding, {}).get("threshold")
            if self.config.abstain_threshold is not None:
                s.threshold = self.config.abstain_threshold
            elif calibrated is None:
                had = " and ".join(sorted(s.calibration)) or "no"
                instead = f"ask with that decoding (`ipm ask --decoding {min(s.calibration)}`), or " if s.calibration else ""
                raise IndexMissing(f"the index of namespace {user!r} was calibrated for {had} decoding, not "
                                   f"{self.config.decoding}: {instead}train it with `ipm train --also-calibrate "
                                   f"{self.config.decoding}` (or also_calibrate = [\"{self.config.decoding}\"] in "
                                   "the config; hybrid needs the dense model installed), or set abstain_threshold")
            else:
                s.threshold = calibrated
                if self.config.decoding == "hybrid":
                    self._warn_if_calibrated_elsewise(user, s.calibration["hybrid"])
                else:
                    self._warn_if_pure_calibrated_elsewise(user, s.calibration["pure"])
        if s.generation != gen:
            # A memory forgotten since (here or by another process) is no longer the one the
            # index learned, even if its ID was added again: it waits for the next train.
            if s.forgets_seen is not None and s.indexed:
                for mid in self.store.forgotten_since(user, s.forgets_seen):
                    s.indexed.pop(mid, None)
            s.forgets_seen = gen
            live = set(self.store.ids(user))
            # Read once a change, not on every ask: a namespace may hold many untrained memories.
            s.pending_words = {m.id: frozenset(content_words(m.text))
                               for m in self.store.get_many(user, live - set(s.indexed)).values()}
            if self._base is not None:  # no index served yet: nothing to put in a trie
                want = live & set(s.indexed)
                for mid in list(s.trie.sequences):
                    if mid not in want:
                        s.trie.remove(mid)
                for mid in want - set(s.trie.sequences):
                    s.trie.add(mid, id_token_ids(self._base.tokenizer, mid))
                s.candidates = None
                if self.config.decoding == "hybrid" and len(s.trie):
                    indexed = [m for m in self.memories_in_order(user) if m.id in s.trie]
                    expansion = None
                    if self.config.expand_retrievers:
                        if s.expansion is None:
                            s.expansion = self._load_expansion(root / s.version, {m.id: m.text for m in indexed})
                        s.expansion = {mid: e for mid, e in s.expansion.items() if mid in live}  # forgotten: gone
                        # A memory updated since training keeps its ID (and its place in the
                        # trie) but not the questions made from its old text.
                        expansion = {m.id: s.expansion[m.id] for m in indexed
                                     if m.id in s.expansion and s.indexed.get(m.id) == m.sha256}
                    if s.text_embeddings_read != s.version:
                        s.embeddings.update(self._read_text_embeddings(root / s.version))
                        s.text_embeddings_read = s.version
                    s.candidates = self._candidates(indexed, s.embeddings, expansion)
                    keep = {m.sha256 for m in indexed}
                    s.embeddings = {sha: e for sha, e in s.embeddings.items() if sha in keep}
                else:  # nothing for the retrievers: what they held of forgotten memories goes too
                    s.embeddings, s.expansion, s.text_embeddings_read = {}, None, None
                s.generation = gen
        return s

    def ask(self, question: str, k: int = 1, user: str = DEFAULT_USER, log: bool = True) -> Answer:
        """Recall up to `k` memories for a question, or abstain ("no memory")."""
        return self.ask_many([question], k=k, user=user, log=log)[0]

    def ask_many(self, questions: list[str], k: int = 1, user: str = DEFAULT_USER, log: bool = True) -> list[Answer]:
        """`ask` for several questions at once: under hybrid decoding the adapter scores them in
        batches (more questions per second than one by one). Each Answer's `seconds` is the
        wall time of the whole call."""
        if not isinstance(questions, (list, tuple)):
            raise InvalidInput("ask_many takes a list of questions")
        for i, question in enumerate(questions):
            try:
                check_question(question)
            except InvalidInput as e:  # which one, where there are several (as an import names its record)
                raise InvalidInput(str(e) if len(questions) == 1 else f"index {i}: {e}") from None
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.config.max_k:
            raise InvalidInput(f"k must be a whole number between 1 and {self.config.max_k} (max_k)")
        check_namespace(user)
        t0 = time.perf_counter()
        answers = []
        # The engine is locked one forward pass's worth of questions at a time, so a long batch
        # does not hold up other callers' asks until it is done.
        for b in range(0, len(questions), ASK_BATCH):
            chunk = list(questions[b:b + ASK_BATCH])
            with self._lock:
                s = self._serve(user)
                found = [[] for _ in chunk]
                if s.adapter is not None and len(s.trie):
                    if self._model.active_adapter != s.adapter:  # PEFT's set_adapter walks every module
                        self._model.set_adapter(s.adapter)
                    found = self._rank_many(self._decoder, chunk, s.trie, s.candidates, k, prompt=s.prompt)
                texts = self.store.get_many(user, sorted({mid for f in found for mid, _, _ in f}))
                # The trie only holds live IDs, and the store is checked again here: a memory
                # forgotten by another process since the trie was synced is never returned.
                ranked = [[Hit(mid, texts[mid].text, p, signals=sig) for mid, p, sig in f if mid in texts]
                          for f in found]
                pending = [self._pending_hits(q, user, s, k) for q in chunk]
                closer = self._pending_closer(chunk, ranked, pending, s)
                threshold = s.threshold
            answers += [self._answer(q, hits, pend, threshold, k, c)
                        for q, hits, pend, c in zip(chunk, ranked, pending, closer)]
        seconds = time.perf_counter() - t0
        for answer in answers:
            answer.seconds = seconds
        if log and answers:
            self.store.log_many(user, "ask", [([h.id for h in a.hits], {"abstained": a.abstained}) for a in answers])
        return answers

    @staticmethod
    def _answer(question: str, hits: list[Hit], pending: list[Hit], threshold: float, k: int,
                pending_closer: bool | None = None) -> Answer:
        """Abstain below the threshold. A memory not indexed yet (pending, matched by its words)
        comes first where the index abstains, or where its share of the question's words is
        above the index's answer's probability, unless `pending_closer` (_pending_closer) says
        that its text is further from the question than the answer's."""
        abstained = not hits or hits[0].score < threshold
        answer_hits = [] if abstained else hits
        if pending and (abstained or (pending[0].score > answer_hits[0].score and pending_closer is not False)):
            answer_hits = (pending + answer_hits)[:k]
            abstained = False
        elif pending:  # pending hits take the last places, after at least the top indexed hit
            answer_hits = (answer_hits[:max(1, k - len(pending))] + pending)[:k]
        return Answer(question, abstained, answer_hits, hits if abstained else answer_hits)

    @staticmethod
    def _pending_closer(questions: list[str], ranked: list[list[Hit]], pending: list[list[Hit]],
                        s: _Serving) -> list[bool | None]:
        """Under hybrid decoding, for each question whose best pending memory shares more of its
        words than the index's answer's probability: is that memory's text closer to the question
        than the answer's (MiniLM cosines of the texts alone)? A word share is a weak judge:
        "My neighbour's dog's name is Rex." holds every content word of "what's my dog's name?",
        and would push out "My dog's name is Max..." answered at 0.99. None where not measured."""
        out: list[bool | None] = [None] * len(questions)
        if s.candidates is None:  # pure decoding: the dense model may not even be installed
            return out
        asked = [i for i, (hits, pend) in enumerate(zip(ranked, pending)) if hits and pend
                 and pend[0].score > hits[0].score]
        if not asked:
            return out
        import torch

        kept = {ranked[i][0].text: s.embeddings.get(sha256(ranked[i][0].text)) for i in asked}  # indexed: encoded
        texts = list(dict.fromkeys(t for i in asked for t in (questions[i], ranked[i][0].text, pending[i][0].text)
                                   if kept.get(t) is None))
        vectors = dict(zip(texts, s.candidates.dense.encoder.encode(texts).float())) if texts else {}
        vectors.update({t: v.float() for t, v in kept.items() if v is not None})

        def cosine(a: str, b: str) -> float:
            return float(torch.dot(vectors[a], vectors[b]))

        for i in asked:
            out[i] = cosine(questions[i], pending[i][0].text) > cosine(questions[i], ranked[i][0].text)
        return out

    def _pending_hits(self, question: str, user: str, s: _Serving, k: int) -> list[Hit]:
        """Memories added (or changed) since the last training are not in the adapter yet:
        match them lexically so they can be recalled at once."""
        q = set(content_words(question))
        if not s.pending_words or not q:
            return []
        overlaps = ((len(q & words) / len(q), mid) for mid, words in s.pending_words.items())
        best = sorted(((o, mid) for o, mid in overlaps if o >= 0.5), key=lambda t: (-t[0], t[1]))[:k]
        texts = self.store.get_many(user, [mid for _, mid in best])  # verbatim, and still there
        return [Hit(mid, texts[mid].text, o, pending=True) for o, mid in best if mid in texts]


def open(home: str | Path | None = None, config: Config | None = None, cache: str | Path | None = None) -> IPM:  # noqa: A001
    """Open (creating if needed) the IPM home directory `home` (default: $IPM_HOME or ./.ipm)."""
    quiet_transformers()
    return IPM(home, config, cache)
