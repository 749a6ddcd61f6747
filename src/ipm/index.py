"""Trained indexes on disk: one directory per version, made current only when complete.

    <home>/indexes/<namespace>/
        v0001/ adapter_model.safetensors, adapter_config.json, manifest.json,
               questions.jsonl (training questions), question_embeddings.safetensors (MiniLM, float16),
               text_embeddings.safetensors (the memories' texts, MiniLM, float32)
        v0002/ ...
        CURRENT            <- the name of the serving version, replaced atomically

A version is written into `vNNNN.tmp-<pid>` and renamed once its files are on disk; CURRENT is
then replaced with os.replace. A crash or Ctrl-C at any point leaves the previous CURRENT.
Versions older than the newest `keep_versions` are then deleted (`retire`, `delete_retired`).

A process writing or deleting a `v*.tmp-*` directory holds a lock on the `.claim` file in it
for as long as it does; one whose claim nobody holds was left by a process that died, and is
deleted under the namespace's lock (`_sweep`: before a new version, and by every purge, since
it may hold a forgotten memory's text), as are the temporary files of a swap (`_replacing`)
that a crash left beside the file it was to replace. A process's ID would not do: a killed
server restarted in a container gets the same one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import IndexDamaged, IndexMissing, IPMWarning, TrainingInProgress

MANIFEST = "manifest.json"
QUESTIONS_FILE = "questions.jsonl"  # a version's training questions, one {"question", "memory_id"} a line
QUESTION_EMBEDDINGS = "question_embeddings.safetensors"  # their MiniLM embeddings (float16), row for row
# The indexed memories' texts' MiniLM embeddings (float32), one row per entry of its metadata's
# "ids" and "sha256" (JSON lists: the memory and the hash of the text embedded): a serving
# process reads them instead of encoding every text again. Derived data: a damaged one is
# deleted by a purge and ignored by the engine, which encodes the texts again.
TEXT_EMBEDDINGS = "text_embeddings.safetensors"
CLAIM = ".claim"  # in a version directory being written or deleted: see _claim
PENDING_FORGETS = ".forgotten-pending"  # IDs forgotten whose purge has yet to finish (JSON: ID -> generation)


# How to recover from an index version that cannot be read: it is derived data, made again
# from the store.
_REBUILD = "run `ipm train` to index the namespace again"


def current_dir(root: Path, strict: bool = True) -> Path | None:
    """The directory of the version CURRENT names; None where no version was made current yet.
    Where CURRENT cannot be read or names a version without a manifest, IndexDamaged:
    answering as if nothing were indexed would hide the damage. A version whose directory was
    deleted (as IndexDamaged says to do) is no index: None. With strict=False, None for any
    of these: a train makes a new version anyway."""
    try:
        name = (root / "CURRENT").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if not strict:
            return None
        raise IndexDamaged(f"{root / 'CURRENT'} cannot be read ({e}): delete it and {_REBUILD}") from None
    path, is_version = root / name, re.fullmatch(r"v\d+", name) is not None
    if is_version and (path / MANIFEST).is_file():
        return path
    if not strict or (is_version and not path.exists()):  # deleted, as IndexDamaged says to
        return None
    if not is_version:
        raise IndexDamaged(f"{root / 'CURRENT'} names {name[:80]!r}, which is not an index version: delete it and "
                           f"{_REBUILD}")
    raise IndexDamaged(f"index version {path} has no {MANIFEST}: delete that directory and {_REBUILD}")


def without_advice(e: IndexDamaged) -> str:
    """What is damaged, without what to do about it: for a train, which is doing it."""
    said = str(e)
    for advice in (f": delete that directory and {_REBUILD}", f": delete it and {_REBUILD}", f": {_REBUILD}"):
        said = said.replace(advice, "")
    return said


def check_adapter(version: Path) -> None:
    """IndexDamaged, naming the version, where its adapter's files are missing or cannot be
    read; checked before PEFT loads them, whose errors would not say which files or what to do."""
    from safetensors import safe_open

    try:
        config = json.loads((version / "adapter_config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("adapter_config.json is not a JSON object")
        with safe_open(str(version / "adapter_model.safetensors"), framework="pt") as f:
            f.keys()  # the header, checked against the file's length: a truncated file fails here
    except Exception as e:  # noqa: BLE001  missing, truncated, not JSON, not safetensors
        raise IndexDamaged(f"index version {version} cannot be read ({type(e).__name__}: {e}): delete that directory "
                           f"and {_REBUILD}") from None


def read_manifest(root: Path) -> dict:
    path = current_dir(root)
    if path is None:
        raise IndexMissing("no trained index yet for this namespace: run `ipm train`")
    return load_manifest(path)


def load_manifest(version: Path) -> dict:
    """A version's manifest; IndexDamaged, naming the version, where it cannot be read."""
    try:
        manifest = json.loads((version / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise IndexDamaged(f"index version {version} cannot be read ({e}): delete that directory and {_REBUILD}") from None
    fields = {"version": str, "ids": dict, "base_model": dict, "config": dict, "metrics": dict}
    missing = [k for k, kind in fields.items() if not isinstance(manifest, dict) or not isinstance(manifest.get(k), kind)]
    if missing:
        raise IndexDamaged(f"index version {version} has a manifest without its {', '.join(missing)}: "
                           f"delete that directory and {_REBUILD}")
    return manifest


def new_version(root: Path) -> tuple[str, Path]:
    """Pick the next version name and return a fresh temporary directory to write it in,
    claimed by this process until `commit_version` or `abandon`."""
    root.mkdir(parents=True, exist_ok=True)
    with locked(root):  # a sweep elsewhere must not take the directory between its making and its claim
        _sweep(root)
        # Never a name served before: where the current version's directory was deleted by hand, a
        # process serving it would take a new version under its name for the one it has loaded.
        try:
            served = (root / "CURRENT").read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            served = ""
        numbers = [int(v.name[1:]) for v in versions(root)] + ([int(served[1:])] if re.fullmatch(r"v\d+", served) else [])
        name = f"v{max(numbers, default=0) + 1:04d}"
        tmp = root / f"{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        _claim(tmp)
    return name, tmp


def abandon(tmp: Path) -> None:
    """Delete a version being written that will not be committed, and let go of its claim."""
    shutil.rmtree(tmp, ignore_errors=True)
    _release(tmp)


# Open claim files by directory: the lock lasts as long as the file stays open in this process.
_CLAIMS: dict[Path, object] = {}


def _claim(directory: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: nothing is swept there (_sweep)
        return
    f = open(directory / CLAIM, "a")  # noqa: SIM115 (closed by _release)
    fcntl.flock(f, fcntl.LOCK_EX)
    _CLAIMS[directory] = f


def _release(directory: Path) -> None:
    f = _CLAIMS.pop(directory, None)
    if f is not None:
        f.close()


def _abandoned(directory: Path) -> bool:
    """Whether a `v*.tmp-*` directory was left by a process that died: nobody holds its claim,
    or it has none (half-deleted, or written before claims). Opened without creating it: a
    directory its owner is deleting must not gain a file."""
    import fcntl

    if directory in _CLAIMS:  # this process's own
        return False
    try:
        fd = os.open(directory / CLAIM, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:  # another user's, say: not ours to judge
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _sweep(root: Path) -> None:
    """Delete what crashed processes left in a namespace's index directory: version directories
    being written or deleted, and temporary files of a swap. Under `locked(root)`, which every
    swap holds. What cannot be deleted (permissions) stays, as before. Not without POSIX locks,
    where nothing tells a live writer's files from a dead one's."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return
    for stale in root.glob("v*.tmp-*"):
        if stale.is_dir() and _abandoned(stale):
            shutil.rmtree(stale, ignore_errors=True)
    for leftover in [*root.glob("*.tmp-*"), *root.glob(".*.tmp-*"),
                     *(f for v in versions(root) for f in v.glob("*.tmp-*"))]:
        if leftover.is_file():
            try:
                leftover.unlink()
            except OSError:
                pass


def versions(root: Path) -> list[Path]:
    """The namespace's complete version directories (vNNNN), oldest first."""
    return sorted((p for p in root.iterdir() if re.fullmatch(r"v\d+", p.name)), key=lambda p: int(p.name[1:]))


def write_manifest(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")


def commit_version(root: Path, name: str, tmp: Path, manifest: dict) -> Path:
    write_manifest(tmp / MANIFEST, manifest)
    # On disk before CURRENT names it, and before older versions are deleted (a power cut
    # must leave one complete version to serve).
    for path in [*tmp.iterdir(), tmp]:
        _fsync(path)
    (tmp / CLAIM).unlink(missing_ok=True)  # (under the namespace's lock: no sweep meanwhile)
    final = root / name
    os.replace(tmp, final)
    _release(tmp)
    pointer = root / f"CURRENT.tmp-{os.getpid()}"
    pointer.write_text(name)
    _fsync(pointer)
    os.replace(pointer, root / "CURRENT")
    _fsync(root)
    return final


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory, where the system cannot open one (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # Windows flushes only a handle open for writing: best effort there
        pass
    finally:
        os.close(fd)


def retire(root: Path, keep: int, also_keep: Path | None = None) -> dict[str, Path]:
    """Move every version but the newest `keep`, the current one and `also_keep` out of the
    way, each renamed to a temporary name (`vNNNN.tmp-<pid>`, which nothing reads), and return
    them by name, for `delete_retired`. Call it under `locked(root)`: the renames are quick,
    the deleting is not. One that cannot be renamed (permissions) is left for the next train."""
    spared = {current_dir(root, strict=False), also_keep}
    retired = {}
    for v in versions(root)[:-keep]:
        if v in spared:
            continue
        doomed = root / f"{v.name}.tmp-{os.getpid()}"
        try:
            os.replace(v, doomed)
            _claim(doomed)  # until deleted: a crash meanwhile leaves it to the next sweep
        except OSError:
            continue
        retired[v.name] = doomed
    return retired


def delete_retired(retired: dict[str, Path]) -> None:
    """Delete what `retire` moved away. Left half-deleted by a crash, a directory is removed by
    the next `new_version`; one that cannot be deleted is named in a warning."""
    for name, path in retired.items():
        shutil.rmtree(path, ignore_errors=True)
        _release(path)
        if path.exists():
            warnings.warn(f"old index version {name} could not be deleted: delete {path} by hand "
                          "(it may hold training questions of forgotten memories)", IPMWarning, stacklevel=2)


def purge(root: Path, live: Callable[[], set[str]], forgotten: frozenset[str] = frozenset(),
          forgotten_since: Callable[[int], set[str]] | None = None) -> list[str]:
    """Take every memory not in `live()` (the namespace's memories in the store, read once the
    lock is held), and the `forgotten` IDs whatever the store says now (one may already have
    been added again, under the same ID, with another text), out of every version of a
    namespace: its training questions (the memory's own text is one of them), those questions'
    embeddings, its text's embedding, and its entry in the manifest's ID set. So a purge that failed half-way (a full
    disk) is finished by the next one, even where the ID was added again meanwhile (the IDs of a
    failed purge are kept in PENDING_FORGETS until one succeeds, as are those of a forget under
    way: see remember_forgotten), and a version that cannot be
    purged does not keep the others from it. Each file is written beside the old one and swapped in,
    under the namespace's lock (`locked`), so two processes (a CLI forget and a server
    training) never lose each other's purge. Returns the versions changed. The adapter's
    weights are not edited: what they learned points at an ID the trie no longer holds, and a
    full retrain (`ipm train --full`) learns without it."""
    if not root.is_dir():
        return []
    with locked(root):
        _sweep(root)  # a crashed training's or swap's files may hold what is forgotten
        # IDs whose purge has not finished, remembered on disk (see remember_forgotten): one added
        # again since is live in the store, but what the versions hold of it is the forgotten text's.
        # A note made before a forget reaches the store counts once the store has logged that
        # forget (`forgotten_since`); until then the memory may still be kept (the forget failed,
        # was killed, or is under way in another process), and the note waits.
        notes = _read_pending(root)
        due, waiting = set(forgotten), {}
        for mid, since in notes.items():
            if since is None or forgotten_since is None or mid in forgotten_since(since):
                due.add(mid)
            elif mid not in due:
                waiting[mid] = since
        keep = live() - due
        changed, failed = [], []
        for v in versions(root):  # one that cannot be purged does not keep the others from it
            try:
                if purge_version(v, keep):
                    changed.append(v.name)
            except IndexDamaged as e:
                failed.append(str(e))
        if failed:
            try:
                _write_pending(root, {**waiting, **dict.fromkeys(due)})
            except OSError:  # a full disk: the store no longer has the memory, the error says what to do
                pass
            raise IndexDamaged("; ".join(failed))
        if waiting != notes:
            try:
                _write_pending(root, waiting)
            except OSError:  # a full disk: the notes stay as they were, and are purged again next time
                pass
        return changed


def remember_forgotten(root: Path, memory_id: str, since: int) -> bool:
    """Note `memory_id` among the IDs whose purge is pending (PENDING_FORGETS), under the
    namespace's lock, before the store forgets it; `since`: the store's generation before the
    forget, so that a purge meanwhile purges it only once the store has logged the forget.
    Whether this wrote the note (one already there stays as it is). Nothing to do for a
    namespace without an index directory."""
    if not root.is_dir():
        return False
    with locked(root):
        notes = _read_pending(root)
        if memory_id in notes:
            return False
        _write_pending(root, {**notes, memory_id: since})
        return True


def take_back_note(root: Path, memory_id: str, since: int, forget_logged: Callable[[], bool]) -> None:
    """Undo remember_forgotten(root, memory_id, since) for a forget the store did not carry out:
    unless the note has changed, or the store has logged a forget of it since all the same
    (another process's, which may not have purged yet)."""
    if not root.is_dir():
        return
    with locked(root):
        notes = _read_pending(root)
        if memory_id in notes and notes[memory_id] == since and not forget_logged():
            _write_pending(root, {k: v for k, v in notes.items() if k != memory_id})


def pending_forgets(root: Path) -> set[str]:
    """The IDs forgotten whose purge from the index files has not finished (PENDING_FORGETS);
    empty where that list cannot be read (the purge says so)."""
    try:
        return set(_read_pending(root))
    except IndexDamaged:
        return set()


def _read_pending(root: Path) -> dict[str, int | None]:
    """The pending notes: ID -> the store generation before its forget, or None where the forget
    is known to have happened (a failed purge's IDs; a plain JSON list, as written before)."""
    try:
        data = json.loads((root / PENDING_FORGETS).read_text(encoding="utf-8"))
        if isinstance(data, list):
            return dict.fromkeys(map(str, data))
        if not isinstance(data, dict) or not all(v is None or (type(v) is int and 0 <= v < 2**63)
                                                 for v in data.values()):
            raise ValueError("not a JSON object of IDs to store generations")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as e:
        raise IndexDamaged(f"{root / PENDING_FORGETS} cannot be read ({e}): it lists memories forgotten whose "
                           "purge from the index files has not finished; if you delete it, also delete the "
                           f"index versions in {root} and {_REBUILD}") from None


def _write_pending(root: Path, notes: dict[str, int | None]) -> None:
    if notes:
        with _replacing(root / PENDING_FORGETS) as tmp:
            tmp.write_text(json.dumps(dict(sorted(notes.items()))), encoding="utf-8")
    else:
        (root / PENDING_FORGETS).unlink(missing_ok=True)


def purge_version(version: Path, live: set[str]) -> bool:
    """Purge one version directory (or one being written) of every memory not in `live`;
    whether anything changed. Call it under `locked(root)`."""
    try:
        return _purge_version(version, live)
    except IndexDamaged as e:  # its manifest cannot be read
        raise IndexDamaged(f"{e} (until then, forgotten memories' training questions may remain in it)") from None
    except Exception as e:  # unreadable JSON, a damaged safetensors file, a full disk...
        raise IndexDamaged(f"index version {version} could not be purged of forgotten memories "
                           f"({type(e).__name__}: {e}); the store no longer has them. Free the disk or fix "
                           "or delete that version, then `ipm train` (which purges first) or any other forget finishes it") from None


def _purge_version(version: Path, live: set[str]) -> bool:
    from safetensors import safe_open
    from safetensors.torch import save_file

    questions, manifest = version / QUESTIONS_FILE, version / MANIFEST
    # One JSON object a line; split on newlines only (a text may hold U+2028, written unescaped).
    rows = [line for line in questions.read_text(encoding="utf-8").split("\n") if line] if questions.is_file() else []
    keep = [i for i, line in enumerate(rows) if json.loads(line)["memory_id"] in live]
    try:
        meta = load_manifest(version) if manifest.is_file() else {}
        damaged = None
    except IndexDamaged as e:  # the texts are purged all the same; the manifest holds IDs only
        meta, damaged = {}, e
    listed = set(meta.get("ids", {})) - live
    texts = version / TEXT_EMBEDDINGS
    text = read_text_embeddings(texts) if texts.is_file() else None
    if texts.is_file() and text is None:  # damaged: derived data, the engine encodes the texts again
        texts.unlink()
    stale = text is not None and not {mid for mid, _, _ in text[1]} <= live
    if len(keep) == len(rows) and not listed and not stale:
        if damaged is not None:
            raise damaged
        return False
    if stale:
        with _replacing(texts) as tmp:
            save_text_embeddings(tmp, [r for r in text[1] if r[0] in live], text[0])
    embeddings = version / QUESTION_EMBEDDINGS
    if embeddings.is_file() and len(keep) < len(rows):
        with safe_open(str(embeddings), framework="pt") as f:
            tensor, metadata = f.get_tensor("embeddings"), f.metadata()
        if len(tensor) == len(rows):
            with _replacing(embeddings) as tmp:
                save_file({"embeddings": tensor[keep].contiguous()}, str(tmp), metadata=metadata)
        else:  # not the file written with these rows: the engine embeds them again anyway
            embeddings.unlink()
    if len(keep) < len(rows):
        with _replacing(questions) as tmp:
            tmp.write_text("".join(rows[i] + "\n" for i in keep), encoding="utf-8")
    if listed:
        meta["ids"] = {k: v for k, v in meta["ids"].items() if k in live}
        if "questions" in meta:
            meta["questions"] = {k: v for k, v in meta["questions"].items() if k in live}
        with _replacing(manifest) as tmp:
            write_manifest(tmp, meta)
    if damaged is not None:
        raise damaged
    return True


def save_text_embeddings(path: Path, rows: list[tuple[str, str, object]], encoder: str) -> None:
    """Write (memory ID, sha256 of its text, embedding) rows as a TEXT_EMBEDDINGS file."""
    import torch
    from safetensors.torch import save_file

    emb = torch.stack([e for _, _, e in rows]).float() if rows else torch.zeros((0, 0))
    save_file({"embeddings": emb.contiguous()}, str(path),
              metadata={"encoder": encoder, "ids": json.dumps([mid for mid, _, _ in rows]),
                        "sha256": json.dumps([sha for _, sha, _ in rows])})


def read_text_embeddings(path: Path) -> tuple[str, list[tuple[str, str, object]]] | None:
    """A TEXT_EMBEDDINGS file's encoder and (memory ID, text sha256, embedding) rows; None where
    it cannot be read or does not hold what its metadata says."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            ids, shas = json.loads(metadata["ids"]), json.loads(metadata["sha256"])
            emb = f.get_tensor("embeddings")
    except Exception:  # noqa: BLE001  a truncated or foreign file: derived data, made again
        return None
    if not (isinstance(ids, list) and isinstance(shas, list) and len(ids) == len(shas) == len(emb)):
        return None
    return metadata.get("encoder", ""), list(zip(ids, shas, emb))


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """An exclusive lock on a namespace's index directory, across processes (POSIX). Not
    re-entrant: a process that holds it and asks again waits for ever."""
    with _lock_file(root, ".lock", wait=True,
                    why=" (a forget's purge left unfinished is finished by the next forget or `ipm train`)"):
        yield


@contextmanager
def training(root: Path, namespace: str) -> Iterator[None]:
    """Hold the namespace's training lock for a training, or refuse at once: two trainings of
    one namespace would do the same minutes of work twice, and the second would replace the
    first's version with its own."""
    with _lock_file(root, ".training", wait=False) as held:
        if not held:
            raise TrainingInProgress(f"namespace {namespace!r} is being trained already (by another process, or "
                                     "another thread of this one): wait for that training to finish")
        yield


@contextmanager
def _lock_file(root: Path, name: str, wait: bool, why: str = "") -> Iterator[bool]:
    """An exclusive lock on the file `name` in `root`, across processes (POSIX), for the block:
    yields whether it is held (False where `wait` is False and another holds it). Without
    POSIX locks, True: one process at a time is the caller's business there."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        f = open(root / name, "a")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise IndexDamaged(f"cannot lock the index directory {root}: {e.strerror}; give this user write permission "
                           f"on it{why}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside `path` to write its new content in, swapped in on success."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)  # the new content on disk before it replaces the old (a power cut)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
