"""Faults with real processes: a `kill -9` during training or import loses nothing committed
and leaves the previous index serving."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ipm
from ipm import index as index_dir
from tests.conftest import MEMORIES


def _ipm(home, tiny_config, cache, *args) -> subprocess.Popen:
    (home / "ipm.toml").write_text("\n".join(
        f"{k} = {json.dumps(v)}" for k, v in tiny_config.to_dict().items() if v is not None))
    env = {**os.environ, "IPM_CACHE": str(cache)}
    cli = Path(sys.executable).parent / "ipm"  # the console script of this environment
    return subprocess.Popen([str(cli), *args, "--home", str(home)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_after(proc: subprocess.Popen, seconds: float) -> None:
    time.sleep(seconds)
    assert proc.poll() is None, f"the process ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def test_kill_during_training_keeps_the_previous_index_serving(mem, memories_file, home, tiny_config, tmp_path):
    mem.import_(memories_file)
    mem.train()
    before = {m.id: m.text for m in mem.list()}
    mem.add("My favourite food is sushi.", id="food_favorite_sushi")
    # Thousands of epochs on the tiny model: still training when killed.
    proc = _ipm(home, tiny_config.updated(epochs=5000), tmp_path / "cache", "train", "--full")
    _kill_after(proc, 8)
    root = home / "indexes" / "default"
    assert index_dir.current_dir(root).name == "v0001"
    again = ipm.open(home, config=tiny_config, cache=tmp_path / "cache")
    assert {m.id: m.text for m in again.list()} == {**before, "food_favorite_sushi": "My favourite food is sushi."}
    a = again.ask(MEMORIES["personal_pet_max"], k=2)
    assert a.candidates and {h.id for h in a.candidates} <= set(before) | {"food_favorite_sushi"}
    # The next training finishes and cleans up what the killed one left.
    assert again.train()["version"] == "v0002"
    assert not list(root.glob("*.tmp-*"))


def test_kill_during_import_writes_all_or_nothing(mem, home, tiny_config, tmp_path):
    mem.add("My dog's name is Max and he is a beagle.", id="personal_pet_max")
    big = tmp_path / "big.jsonl"
    n = 60000
    big.write_text("".join(json.dumps({"text": f"Fact number {i}: the locker code is {i * 7919 % 100000}."}) + "\n"
                           for i in range(n)))
    proc = _ipm(home, tiny_config, tmp_path / "cache", "import", str(big))
    _kill_after(proc, 2.5)
    again = ipm.open(home, config=tiny_config, cache=tmp_path / "cache")
    count = again.store.count("default")
    assert count in (1, 1 + n), f"a killed import left {count - 1} of {n} records"
    assert again.get("personal_pet_max").text == "My dog's name is Max and he is a beagle."
    assert again.store._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_model_hash_cache_keeps_entries_other_processes_wrote(tmp_path, monkeypatch):
    """Two processes hashing different models at once must not drop each other's cache entry."""
    from ipm import model
    from ipm.config import Paths

    paths = Paths.at(tmp_path / "home", tmp_path / "cache")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"model a")
    b.write_bytes(b"model b")
    assert model.model_sha256(a, paths) == model.file_sha256(a)
    cache_file = paths.models / "hashes.json"
    real_sha256 = model.file_sha256

    def sha256_while_another_process_writes(path):
        # Another process adds its entry after this one read the cache, before it writes back.
        cache_file.write_text(json.dumps(json.loads(cache_file.read_text()) | {"elsewhere": "f" * 64}))
        return real_sha256(path)

    monkeypatch.setattr(model, "file_sha256", sha256_while_another_process_writes)
    assert model.model_sha256(b, paths) == real_sha256(b)
    known = json.loads(cache_file.read_text())
    assert known["elsewhere"] == "f" * 64
    assert sorted(known.values()) == sorted([real_sha256(a), real_sha256(b), "f" * 64])
    assert not list(paths.models.glob("*.tmp*"))


def test_model_hash_works_when_the_cache_cannot_be_written(tmp_path):
    from ipm.config import Paths
    from ipm.model import file_sha256, model_sha256

    paths = Paths.at(tmp_path / "home", tmp_path / "cache")
    paths.cache.mkdir()
    paths.models.write_text("not a directory")  # unwritable even for root
    a = tmp_path / "a.gguf"
    a.write_bytes(b"model a")
    assert model_sha256(a, paths) == file_sha256(a)


def test_a_model_cache_that_cannot_be_written_is_said_before_converting(tmp_path):
    import pytest

    from ipm.config import Paths
    from ipm.errors import ModelError
    from ipm.model import convert_gguf

    paths = Paths.at(tmp_path / "home", tmp_path / "cache")
    paths.cache.mkdir()
    paths.models.write_text("not a directory")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a model either")  # converting it would fail with another error
    with pytest.raises(ModelError, match=f"cannot write the model cache {paths.cache}: .*set IPM_CACHE"):
        convert_gguf(gguf, paths)
    paths.models.unlink()  # a cache that works: the conversion's own failure, with nothing left behind
    with pytest.raises(ModelError, match="could not convert GGUF model"):
        convert_gguf(gguf, paths)
    assert not list(paths.models.glob("*.tmp*"))


def test_a_purge_deletes_what_killed_processes_left_and_spares_what_live_ones_write(tmp_path):
    """A killed training leaves its `v*.tmp-*` directory, and a killed forget the temporary file
    of a swap, each holding memories' texts: a later forget must not leave a forgotten text in
    them. A directory still claimed by a live process stays; a dead one's goes, whatever its
    process ID (a server restarted in a container has the same one)."""
    from tests.test_engine import fake_version

    root = tmp_path / "indexes" / "u"
    secret = "my pin is 4812"
    fake_version(root, "v0001", [(secret, "personal_pin_secret"), ("a note", "note_keep_one")])
    (root / "CURRENT").write_text("v0001")
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from ipm import index; "
                               "print(index.new_version(Path(sys.argv[1]))[1], flush=True); time.sleep(600)", str(root)],
        stdout=subprocess.PIPE, text=True)
    try:
        writing = Path(writer.stdout.readline().strip())
        assert writing.name.startswith("v0002.tmp-")
        (writing / "questions.jsonl").write_text("a note")  # what a live training writes
        # What dead processes left, made after the writer's own sweep: the purge must clear them
        stray = root / "v0001" / "questions.jsonl.tmp-x1y2"  # a swap cut short
        stray.write_text(json.dumps({"question": secret, "memory_id": "personal_pin_secret"}) + "\n")
        (root / ".forgotten-pending.tmp-abc").write_text("[]")
        for pid in (os.getpid(), 1):  # an ID that is alive, and ours: neither says whether its writer is
            dead = root / f"v0003.tmp-{pid}"
            dead.mkdir()
            (dead / "questions.jsonl").write_text(secret)
            (dead / ".claim").touch()  # claimed once, by a process now dead
        index_dir.purge(root, lambda: {"note_keep_one"}, frozenset({"personal_pin_secret"}))
        assert (writing / "questions.jsonl").read_text() == "a note"  # claimed by a live process
        left = [p.relative_to(root).as_posix() for p in root.rglob("*") if secret in _read(p)]
        assert left == [], left
        assert not stray.exists() and not (root / ".forgotten-pending.tmp-abc").exists()
        writer.kill()
        writer.wait(30)
        name, tmp = index_dir.new_version(root)  # the dead writer's directory is cleared, ours made
        assert name == "v0002" and tmp.is_dir() and not writing.exists()
        assert [p.name for p in root.glob("v*.tmp-*")] == [tmp.name]
        index_dir.abandon(tmp)
        assert not tmp.exists()
    finally:
        writer.kill()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def test_an_index_directory_that_cannot_be_locked_says_how_the_purge_is_finished(tmp_path):
    import pytest

    from ipm.errors import IndexDamaged

    root = tmp_path / "indexes" / "u"
    (root / ".lock").mkdir(parents=True)  # cannot be opened for writing, even by root
    with pytest.raises(IndexDamaged, match="cannot lock the index directory .*write permission.*next forget or `ipm train`"):
        index_dir.purge(root, lambda: set(), frozenset({"personal_pin_secret"}))


def test_a_second_training_of_a_namespace_is_refused_while_one_is_under_way(mem, memories_file, home, tiny_config,
                                                                           tmp_path):
    """Two `ipm train` at once did the same minutes of work twice; the second is now refused."""
    mem.import_(memories_file)
    proc = _ipm(home, tiny_config.updated(epochs=5000), tmp_path / "cache", "train")
    try:
        deadline = time.monotonic() + 120
        while not (home / "indexes" / "default" / ".training").exists():  # its training lock
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(1)  # (made, then locked)
        import pytest

        from ipm.errors import TrainingError
        with pytest.raises(TrainingError, match="'default' is being trained already"):
            mem.train()
    finally:
        _kill_after(proc, 0)
    assert index_dir.current_dir(home / "indexes" / "default") is None
    assert mem.train()["version"] == "v0001"  # the lock went with the killed process


def test_sigterm_during_an_import_into_a_new_home_leaves_no_home_or_all_of_it(home, tiny_config, tmp_path):
    """`kill` (SIGTERM) is taken as Ctrl-C: the import is rolled back and the home it made is
    removed, as for a refused import (it left an empty store and a 29 MB WAL)."""
    big = tmp_path / "big.jsonl"
    n = 60000
    big.write_text("".join(json.dumps({"text": f"Fact number {i}: the locker code is {i * 7919 % 100000}."}) + "\n"
                           for i in range(n)))
    new = tmp_path / "new-home"
    env = {**os.environ, "IPM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ipm"), "import", str(big), "--home", str(new)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # it had committed: all of it is there
        assert ipm.open(new).store.count("default") == n
    else:
        assert proc.returncode == 130 and b"interrupted" in err, err
        assert not new.exists()
