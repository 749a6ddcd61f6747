"""The memory store: raw texts kept losslessly in one SQLite file, with an event log.

Why SQLite: one file, transactions, WAL so readers never block the writer, and it is in the
standard library. Every write is one transaction, so a rejected record writes nothing.
Texts are stored as given (no stripping, no normalisation); `sha256` is of the UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from .config import MAX_TEXT_BYTES
from .errors import DuplicateID, HomeError, InvalidInput, NotFound
from .ids import mint_id, validate_id

NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_QUESTION_CHARS = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    namespace  TEXT NOT NULL,
    id         TEXT NOT NULL,
    text       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    version    INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (namespace, id)
);
CREATE TABLE IF NOT EXISTS questions (
    namespace TEXT NOT NULL,
    memory_id TEXT NOT NULL,
    question  TEXT NOT NULL,
    PRIMARY KEY (namespace, memory_id, question),
    FOREIGN KEY (namespace, memory_id) REFERENCES memories (namespace, id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS history (
    namespace  TEXT NOT NULL,
    id         TEXT NOT NULL,
    version    INTEGER NOT NULL,
    text       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (namespace, id, version)
);
CREATE TABLE IF NOT EXISTS events (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    ts        TEXT NOT NULL,
    namespace TEXT NOT NULL,
    action    TEXT NOT NULL,
    ids       TEXT NOT NULL,
    detail    TEXT NOT NULL
);
-- A namespace's events, newest first (`ipm log`), and its last change (`generation`, read on
-- every ask): without these, both read every namespace's asks, which only ever grow.
CREATE INDEX IF NOT EXISTS events_by_namespace ON events (namespace, seq);
CREATE INDEX IF NOT EXISTS changes_by_namespace ON events (namespace, seq) WHERE action != 'ask';
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def questions_digest(questions: list[str]) -> str:
    """One hash of a memory's user-given questions, in any order: an index records it to know
    which questions it learned (questions imported later make the memory untrained)."""
    return sha256(json.dumps(sorted(questions), ensure_ascii=False))


@dataclass
class Memory:
    id: str
    text: str
    namespace: str
    sha256: str
    version: int
    created_at: str
    updated_at: str
    questions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "id": self.id, "text": self.text, "namespace": self.namespace, "sha256": self.sha256,
            "version": self.version, "created_at": self.created_at, "updated_at": self.updated_at,
            "questions": list(self.questions),
        }


@dataclass
class Event:
    seq: int
    ts: str
    namespace: str
    action: str
    ids: list[str]
    detail: dict

    def to_dict(self) -> dict:
        return {"seq": self.seq, "ts": self.ts, "namespace": self.namespace, "action": self.action,
                "ids": self.ids, "detail": self.detail}


SQL_INT_CAP = 2**62  # a LIMIT or OFFSET past this is "all": SQLite's integers are 64-bit


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not NAMESPACE_PATTERN.fullmatch(namespace):
        raise InvalidInput(
            f"namespace {namespace!r} is invalid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return namespace


def _looked_up(memory_id, namespace: str) -> str:
    """An ID to look up: one that could not be stored (not a string, or not valid Unicode, e.g.
    bytes a shell passed that are not UTF-8) is simply not there, rather than a database error."""
    if not isinstance(memory_id, str):
        raise InvalidInput(f"a memory ID must be a string, got {type(memory_id).__name__}")
    try:
        memory_id.encode("utf-8")
    except UnicodeEncodeError:
        raise NotFound(f"no memory {memory_id!r} in namespace {namespace!r}: it is not valid UTF-8 text") from None
    return memory_id


def check_text(text, max_bytes: int = MAX_TEXT_BYTES, what: str = "memory text") -> str:
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInput(f"{what} is empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} contains characters that are not valid Unicode (lone surrogates)") from None
    if size > max_bytes:
        raise InvalidInput(f"{what} is {size} bytes; the limit is {max_bytes} bytes of UTF-8")
    return text


def check_question(question) -> str:
    check_text(question, what="question")
    if len(question) > MAX_QUESTION_CHARS:
        raise InvalidInput(f"question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    return question


@dataclass
class NewMemory:
    """A memory to add: text, optional ID, optional user-given training questions."""

    text: str
    id: str | None = None
    questions: list[str] = field(default_factory=list)


# SQLite's result codes that say the file could not be read or written (a full or failing disk,
# permissions), not that it is damaged or not a database; and those that say another process
# holds it.
DISK_ERRORS = ("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM")
LOCK_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED")


def store_error_message(e: sqlite3.Error, path: str | Path) -> str | None:
    """What to tell a user of an SQLite error on the store at `path` that is not the store's
    fault (the disk's, or another process's lock); None for any other."""
    name = getattr(e, "sqlite_errorname", "")
    if name.startswith("SQLITE_CANTOPEN") and _on_read_only_file_system(path):
        return (f"{path} is on a read-only file system ({e}): ipm opens its store for writing, also to read it; "
                "put the home on a writable one")
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM")):
        return (f"{path} cannot be written ({e}): ipm writes to its store to change it and to log every ask, and "
                "opens it for writing to read it; give this user write permission on the home and the files in it")
    if name.startswith(DISK_ERRORS):
        return (f"{path} cannot be read or written ({e}): check the disk that holds it (is it full?) and its "
                "permissions; the store itself is likely intact, and a write that failed was rolled back")
    if name.startswith(LOCK_ERRORS):
        return f"{path} is locked by another process writing to it ({e}); try again once it is done"
    return None


def _on_read_only_file_system(path: str | Path) -> bool:
    """Whether `path` (or the nearest directory above it that exists) is on a file system
    mounted read-only; False where that cannot be told (a label, not a path; no statvfs)."""
    p = Path(path)
    if not p.exists() and len(p.parts) < 2:  # a label ("the store")
        return False
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


class Store:
    """All memories of all namespaces, in one SQLite database."""

    def __init__(self, path: str | Path, max_text_bytes: int = MAX_TEXT_BYTES, id_scheme: str = "lexicon"):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise HomeError(f"the home {self.path.parent} is not a directory: point --home or $IPM_HOME at a directory") from None
        except PermissionError as e:
            raise HomeError(f"cannot create the home {self.path.parent}: {e.strerror}") from None
        self.max_text_bytes = max_text_bytes
        self.id_scheme = id_scheme  # how IDs are minted for memories added without one (ids.mint_id)
        self._local = threading.local()
        try:
            self._conn().executescript(SCHEMA)  # idempotent; executescript manages its own transaction
        except sqlite3.DatabaseError as e:
            self.close()
            said = store_error_message(e, self.path)  # the disk's fault or a lock, not the file's
            if said:
                raise HomeError(said) from None
            raise HomeError(f"{self.path} cannot be opened as an IPM store ({e}); move it away or use another home") from None

    # -- connection handling --------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=ON")  # forgotten texts are overwritten, not just unlinked
            conn.execute("PRAGMA busy_timeout=30000")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front so concurrent
        writers queue instead of failing half-way."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- events ---------------------------------------------------------------------------
    @staticmethod
    def _log(db: sqlite3.Connection, namespace: str, action: str, ids: Iterable[str], **detail) -> None:
        db.execute(
            "INSERT INTO events (ts, namespace, action, ids, detail) VALUES (?, ?, ?, ?, ?)",
            (now(), namespace, action, json.dumps(list(ids)), json.dumps(detail, ensure_ascii=False)),
        )

    def log(self, namespace: str, action: str, ids: Iterable[str] = (), **detail) -> None:
        self.log_many(namespace, action, [(ids, detail)])

    def log_many(self, namespace: str, action: str, entries: Iterable[tuple[Iterable[str], dict]]) -> None:
        """Several events of one action, (ids, detail) each, in one transaction (a batch of asks)."""
        with self._write() as db:
            for ids, detail in entries:
                self._log(db, namespace, action, ids, **detail)

    def generation(self, namespace: str) -> int:
        """A number that changes whenever the namespace's memories change (not on asks)."""
        row = self._conn().execute(
            "SELECT MAX(seq) FROM events WHERE namespace = ? AND action != 'ask'", (namespace,)).fetchone()
        return row[0] or 0

    def forgotten_since(self, namespace: str, generation: int) -> set[str]:
        """The IDs forgotten after `generation` (a value of `generation()`), whatever the store
        holds under them now."""
        rows = self._conn().execute("SELECT ids FROM events WHERE namespace = ? AND action = 'forget' AND seq > ?",
                                    (namespace, generation))
        return {mid for (ids,) in rows for mid in json.loads(ids)}

    def events(self, namespace: str, limit: int | None = None) -> list[Event]:
        check_namespace(namespace)
        sql = "SELECT * FROM events WHERE namespace = ? ORDER BY seq DESC"
        rows = self._conn().execute(sql + (" LIMIT ?" if limit else ""),
                                    (namespace, min(limit, SQL_INT_CAP)) if limit else (namespace,))
        out = [Event(r["seq"], r["ts"], r["namespace"], r["action"], json.loads(r["ids"]), json.loads(r["detail"]))
               for r in rows]
        return out[::-1]

    # -- reads ----------------------------------------------------------------------------
    def _memory(self, row: sqlite3.Row, questions: list[str] | None = None) -> Memory:
        return Memory(row["id"], row["text"], row["namespace"], row["sha256"], row["version"],
                      row["created_at"], row["updated_at"], questions or [])

    def get(self, namespace: str, memory_id: str) -> Memory:
        check_namespace(namespace)
        _looked_up(memory_id, namespace)
        conn = self._conn()
        row = conn.execute("SELECT * FROM memories WHERE namespace = ? AND id = ?", (namespace, memory_id)).fetchone()
        if row is None:
            raise NotFound(f"no memory {memory_id!r} in namespace {namespace!r} (see `ipm list`)")
        qs = [r[0] for r in conn.execute(
            "SELECT question FROM questions WHERE namespace = ? AND memory_id = ? ORDER BY rowid",
            (namespace, memory_id))]
        return self._memory(row, qs)

    def get_many(self, namespace: str, memory_ids: Iterable[str]) -> dict[str, Memory]:
        ids = list(memory_ids)
        if not ids:
            return {}
        # One JSON parameter, not one per ID: SQLite caps the number of parameters (32,766 in
        # stock builds), and a namespace may have more memories pending than that.
        rows = self._conn().execute(
            "SELECT * FROM memories WHERE namespace = ? AND id IN (SELECT value FROM json_each(?))",
            (namespace, json.dumps(ids)))
        return {r["id"]: self._memory(r) for r in rows}

    def list(self, namespace: str, limit: int | None = None, offset: int = 0) -> list[Memory]:
        """The namespace's memories, oldest first (those added at once in the order given); `limit` and
        `offset` page through them."""
        check_namespace(namespace)
        if (limit is not None and limit < 1) or offset < 0:
            raise InvalidInput("limit must be at least 1 and offset at least 0")
        conn = self._conn()
        rows = conn.execute("SELECT * FROM memories WHERE namespace = ? ORDER BY created_at, rowid LIMIT ? OFFSET ?",
                            (namespace, -1 if limit is None else min(limit, SQL_INT_CAP), min(offset, SQL_INT_CAP))).fetchall()
        qs: dict[str, list[str]] = {}
        if limit is None and not offset:
            found = conn.execute("SELECT memory_id, question FROM questions WHERE namespace = ? ORDER BY rowid",
                                 (namespace,))
        else:  # the page's questions only
            found = conn.execute("SELECT memory_id, question FROM questions WHERE namespace = ? AND memory_id IN "
                                 "(SELECT value FROM json_each(?)) ORDER BY rowid",
                                 (namespace, json.dumps([r["id"] for r in rows])))
        for r in found:
            qs.setdefault(r[0], []).append(r[1])
        return [self._memory(r, qs.get(r["id"])) for r in rows]

    def ids(self, namespace: str) -> list[str]:
        return [r[0] for r in self._conn().execute(
            "SELECT id FROM memories WHERE namespace = ? ORDER BY id", (check_namespace(namespace),))]

    def hashes(self, namespace: str) -> dict[str, str]:
        """Each memory's ID and its text's sha256: what an index is checked against."""
        return dict(self._conn().execute("SELECT id, sha256 FROM memories WHERE namespace = ?",
                                         (check_namespace(namespace),)).fetchall())

    def question_digests(self, namespace: str) -> dict[str, str]:
        """questions_digest of each memory that has user-given questions, by ID."""
        asked: dict[str, list[str]] = {}
        for mid, question in self._conn().execute("SELECT memory_id, question FROM questions WHERE namespace = ?",
                                                  (check_namespace(namespace),)):
            asked.setdefault(mid, []).append(question)
        return {mid: questions_digest(qs) for mid, qs in asked.items()}

    def count(self, namespace: str) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM memories WHERE namespace = ?",
                                    (check_namespace(namespace),)).fetchone()[0]

    def namespaces(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT DISTINCT namespace FROM memories ORDER BY 1")]

    def history(self, namespace: str, memory_id: str) -> list[dict]:
        """Earlier versions of a memory (oldest first), then the current one."""
        current = self.get(namespace, memory_id)
        rows = self._conn().execute(
            "SELECT version, text, sha256, created_at FROM history WHERE namespace = ? AND id = ? ORDER BY version",
            (namespace, memory_id))
        out = [dict(r) for r in rows]
        out.append({"version": current.version, "text": current.text, "sha256": current.sha256,
                    "created_at": current.updated_at})
        return out

    # -- writes ---------------------------------------------------------------------------
    def add_many(self, namespace: str, records: list[NewMemory], source: str = "add",
                 labels: list[str] | None = None) -> list[Memory]:
        """Validate every record first, then write them all in one transaction (or nothing).

        Errors name the record (`labels[i]`, default `record i`) when there is more than one."""
        check_namespace(namespace)
        many = len(records) > 1 or labels is not None

        def where(i: int) -> str:
            return (f"{labels[i]}: " if labels else f"record {i}: ") if many else ""

        for i, rec in enumerate(records):
            try:
                check_text(rec.text, self.max_text_bytes)
                if rec.id is not None:
                    validate_id(rec.id)
                for q in rec.questions:
                    check_question(q)
            except InvalidInput as e:
                raise type(e)(f"{where(i)}{e}") from None
        with self._write() as db:
            taken = {r[0] for r in db.execute("SELECT id FROM memories WHERE namespace = ?", (namespace,))}
            first: dict[str, int] = {}  # ID -> the record that gives it first
            for i, rec in enumerate(records):
                if rec.id is None:
                    continue
                if rec.id in taken:
                    raise DuplicateID(f"{where(i)}memory ID {rec.id!r} is already taken in namespace {namespace!r}; "
                                      "choose another ID, or use update to change its text")
                if rec.id in first:
                    also = labels[first[rec.id]].rsplit(": ", 1)[-1] if labels else f"record {first[rec.id]}"
                    raise DuplicateID(f"{where(i)}memory ID {rec.id!r} is given twice in this input (also {also}); "
                                      "IDs must be unique")
                first[rec.id] = i
            taken |= set(first)
            stamp = now()
            out = []
            for rec in records:
                memory_id = rec.id or mint_id(rec.text, taken, self.id_scheme)
                taken.add(memory_id)
                db.execute(
                    "INSERT INTO memories (namespace, id, text, sha256, version, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, 1, ?, ?)",
                    (namespace, memory_id, rec.text, sha256(rec.text), stamp, stamp))
                qs = list(dict.fromkeys(rec.questions))
                db.executemany("INSERT OR IGNORE INTO questions VALUES (?, ?, ?)",
                               [(namespace, memory_id, q) for q in qs])
                out.append(Memory(memory_id, rec.text, namespace, sha256(rec.text), 1, stamp, stamp, qs))
            self._log(db, namespace, source, [m.id for m in out], count=len(out))
        return out

    def add(self, namespace: str, text: str, memory_id: str | None = None,
            questions: Iterable[str] = ()) -> Memory:
        return self.add_many(namespace, [NewMemory(text, memory_id, list(questions))])[0]

    def add_questions(self, namespace: str, pairs: list[tuple[str, str]], labels: list[str] | None = None) -> int:
        """Attach user-given training questions to existing memories: all or nothing.
        Returns how many were new."""
        check_namespace(namespace)
        labels = labels or [f"record {i}" for i in range(len(pairs))]
        for i, (memory_id, q) in enumerate(pairs):
            try:
                check_question(q)
            except InvalidInput as e:
                raise InvalidInput(f"{labels[i]}: {e}") from None
        with self._write() as db:
            known = {r[0] for r in db.execute("SELECT id FROM memories WHERE namespace = ?", (namespace,))}
            for i, (memory_id, _) in enumerate(pairs):
                if memory_id not in known:
                    raise NotFound(f"{labels[i]}: no memory {memory_id!r} in namespace {namespace!r}; "
                                   "import the memories before their questions")
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO questions VALUES (?, ?, ?)",
                           [(namespace, m, q) for m, q in pairs])
            added = db.total_changes - before
            self._log(db, namespace, "questions", sorted({m for m, _ in pairs}), count=added)
        return added

    def update(self, namespace: str, memory_id: str, text: str) -> Memory:
        """Replace a memory's text; the old version moves to the history."""
        check_namespace(namespace)
        _looked_up(memory_id, namespace)
        check_text(text, self.max_text_bytes)
        with self._write() as db:
            row = db.execute("SELECT * FROM memories WHERE namespace = ? AND id = ?", (namespace, memory_id)).fetchone()
            if row is None:
                raise NotFound(f"no memory {memory_id!r} in namespace {namespace!r}")
            db.execute("INSERT INTO history VALUES (?, ?, ?, ?, ?, ?)",
                       (namespace, memory_id, row["version"], row["text"], row["sha256"], row["updated_at"]))
            stamp = now()
            db.execute("UPDATE memories SET text = ?, sha256 = ?, version = version + 1, updated_at = ? "
                       "WHERE namespace = ? AND id = ?", (text, sha256(text), stamp, namespace, memory_id))
            self._log(db, namespace, "update", [memory_id], version=row["version"] + 1)
        return self.get(namespace, memory_id)

    def forget(self, namespace: str, memory_id: str) -> None:
        """Delete a memory, its questions and its history. The log keeps the ID, not the text."""
        check_namespace(namespace)
        _looked_up(memory_id, namespace)
        with self._write() as db:
            cur = db.execute("DELETE FROM memories WHERE namespace = ? AND id = ?", (namespace, memory_id))
            if cur.rowcount == 0:
                raise NotFound(f"no memory {memory_id!r} in namespace {namespace!r}")
            db.execute("DELETE FROM history WHERE namespace = ? AND id = ?", (namespace, memory_id))
            db.execute("DELETE FROM questions WHERE namespace = ? AND memory_id = ?", (namespace, memory_id))
            self._log(db, namespace, "forget", [memory_id])
        # The write-ahead log still holds the pages as they were before: copy it back and empty
        # it now rather than at some later checkpoint. Best effort, waiting a second at most: a
        # reader in another process keeps it until the next checkpoint that finds none.
        conn = self._conn()
        conn.execute("PRAGMA busy_timeout=1000")
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.execute("PRAGMA busy_timeout=30000")

    def questions(self, namespace: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self._conn().execute("SELECT memory_id, question FROM questions WHERE namespace = ? ORDER BY rowid",
                                      (check_namespace(namespace),)):
            out.setdefault(r[0], []).append(r[1])
        return out
