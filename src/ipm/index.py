"""Trained indexes on disk: one directory per version, made current only when complete.

    <home>/indexes/<namespace>/
        v0001/ adapter_model.safetensors, adapter_config.json, manifest.json,
               questions.jsonl (training questions), question_embeddings.safetensors (MiniLM, float16)
        v0002/ ...
        CURRENT            <- the name of the serving version, replaced atomically

A version is written into `vNNNN.tmp-<pid>` and renamed once its files are on disk; CURRENT is
then replaced with os.replace. A crash or Ctrl-C at any point leaves the previous CURRENT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import IndexMissing

MANIFEST = "manifest.json"
QUESTIONS_FILE = "questions.jsonl"  # a version's training questions, one {"question", "memory_id"} a line
QUESTION_EMBEDDINGS = "question_embeddings.safetensors"  # their MiniLM embeddings (float16), row for row


def current_dir(root: Path) -> Path | None:
    try:
        name = (root / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    return path if (path / MANIFEST).is_file() else None


def read_manifest(root: Path) -> dict:
    path = current_dir(root)
    if path is None:
        raise IndexMissing("no trained index yet for this namespace: run `ipm train`")
    return json.loads((path / MANIFEST).read_text())


def new_version(root: Path) -> tuple[str, Path]:
    """Pick the next version name and return a fresh temporary directory to write it in."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("v*.tmp-*"):  # left by a crash
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name))]
    name = f"v{max(numbers, default=0) + 1:04d}"
    tmp = root / f"{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    return name, tmp


def commit_version(root: Path, name: str, tmp: Path, manifest: dict) -> Path:
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    final = root / name
    os.replace(tmp, final)
    pointer = root / f"CURRENT.tmp-{os.getpid()}"
    pointer.write_text(name)
    os.replace(pointer, root / "CURRENT")
    return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def purge(root: Path, memory_ids: set[str]) -> list[str]:
    """Take forgotten memories out of every version of a namespace: their training questions
    (the memory's own text is one of them) and those questions' embeddings, and their entry
    in the manifest's ID set. Each file is written beside the old one and replaced atomically;
    returns the versions changed. The adapter's weights are not edited: what they learned
    points at an ID the trie no longer holds, and a full retrain (`ipm train --full`)
    learns without it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = []
    versions = sorted(p for p in root.iterdir() if re.fullmatch(r"v\d+", p.name)) if root.is_dir() else []
    for version in versions:
        questions, manifest = version / QUESTIONS_FILE, version / MANIFEST
        rows = questions.read_text(encoding="utf-8").splitlines(keepends=True) if questions.is_file() else []
        keep = [i for i, line in enumerate(rows) if json.loads(line)["memory_id"] not in memory_ids]
        meta = json.loads(manifest.read_text()) if manifest.is_file() else {}
        listed = memory_ids & set(meta.get("ids", {}))
        if len(keep) == len(rows) and not listed:
            continue
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
                tmp.write_text("".join(rows[i] for i in keep), encoding="utf-8")
        if listed:
            meta["ids"] = {k: v for k, v in meta["ids"].items() if k not in memory_ids}
            with _replacing(manifest) as tmp:
                tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        changed.append(version.name)
    return changed


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write its new content in, swapped in on success."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
