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
from pathlib import Path

from .errors import IndexMissing

MANIFEST = "manifest.json"


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
