"""The public API end to end on the tiny model: store -> train -> recall, versions, forgetting."""

import json
import shutil
import warnings

import pytest

import ipm
from ipm import index as index_dir
from ipm.errors import IndexDamaged, IndexMissing, InvalidInput, ModelError, NotFound, TrainingError
from ipm.store import questions_digest
from ipm.train import Example
from tests.conftest import MEMORIES, tiny_config_for


@pytest.fixture(scope="module")
def trained_home(tiny_model, tmp_path_factory):
    """A home with MEMORIES imported and trained on the tests' config, made once and copied for
    each test that asks for `trained`: training is most of these tests' time."""
    root = tmp_path_factory.mktemp("trained")
    m = ipm.open(root / "home", config=tiny_config_for(tiny_model), cache=root / "cache")
    m.import_records(MEMORIES)
    m.train()
    m.store.close()
    return root / "home"


@pytest.fixture
def trained(trained_home, home, tiny_config, tmp_path):
    """An engine on a home of its own holding a trained index (a copy of `trained_home`)."""
    import shutil

    shutil.copytree(trained_home, home)
    m = ipm.open(home, config=tiny_config, cache=tmp_path / "cache")
    yield m
    m.store.close()


def test_train_writes_a_complete_version(trained, home):
    root = home / "indexes" / "default"
    cur = index_dir.current_dir(root)
    assert cur.name == "v0001"
    assert (cur / "adapter_model.safetensors").is_file() and (cur / "adapter_config.json").is_file()
    manifest = json.loads((cur / "manifest.json").read_text())
    assert set(manifest["ids"]) == set(MEMORIES)
    assert manifest["base_model"]["sha256"] and manifest["metrics"]["path"] == "fast"
    assert manifest["config"]["seed"] == 0
    phases = manifest["metrics"]["phase_seconds"]
    assert list(phases) == ["questions", "retrievers", "train", "calibrate"] and min(phases.values()) >= 0
    assert phases["train"] >= manifest["metrics"]["train_seconds"]  # train_adapter's own wall time is inside it
    assert sum(phases.values()) <= manifest["metrics"]["total_seconds"]
    assert [e.action for e in trained.log()][-1] == "train"
    assert trained.log()[-1].detail["path"] == "indexes/default/v0001"  # within the home, wherever it is


def test_recall_returns_stored_text_verbatim(trained):
    for mid, text in MEMORIES.items():
        a = trained.ask(text, k=2)
        assert a.candidates[0].id == mid, f"memory text should recall its own ID after training: {a}"
        if not a.abstained:
            assert a.hits[0].text == text
        for h in a.candidates:
            assert h.text == MEMORIES[h.id]


@pytest.fixture(params=["hybrid", "pure"])
def decoding(request):
    return request.param


def test_hits_are_always_live_ids(trained, decoding):
    trained.reconfigure(decoding=decoding)
    for q in ["what is my dog called?", "who is anna", "qwerty", "🐶", "a" * 500]:
        a = trained.ask(q, k=4)
        assert {h.id for h in a.candidates} <= set(MEMORIES)


def test_ask_many_answers_like_ask_one_by_one(mem, memories_file, tiny_config, decoding):
    # float32, so that batched and single forward passes agree to rounding
    mem.config = tiny_config.updated(dtype="float32", decoding=decoding)
    mem.import_(memories_file)
    mem.train()
    trained = mem
    questions = ["what is my dog called?", "Which medicine can't I take?", "where does my sister live?",
                 "what car do I drive?", "x"]
    batch = trained.ask_many(questions, k=3)
    assert [a.question for a in batch] == questions
    for q, a in zip(questions, batch):
        one = trained.ask(q, k=3)
        assert a.abstained == one.abstained
        assert [h.id for h in a.candidates] == [h.id for h in one.candidates]
        for h, o in zip(a.candidates, one.candidates):
            assert h.score == pytest.approx(o.score, rel=1e-3, abs=1e-6) and h.text == o.text
    asks = [e for e in trained.log() if e.action == "ask"]
    batch_events = asks[-2 * len(questions):-len(questions)]  # the batch, before the one-by-one asks
    assert [e.ids for e in batch_events] == [[h.id for h in a.hits] for a in batch]
    assert [e.detail["abstained"] for e in batch_events] == [a.abstained for a in batch]
    assert trained.ask_many([], k=3) == []
    with pytest.raises(InvalidInput, match="list"):
        trained.ask_many("what is my dog called?")
    with pytest.raises(InvalidInput, match="query-time"):
        trained.reconfigure(dtype="float32")
    logged = len(trained.log())
    with pytest.raises(InvalidInput, match="^index 1: question is empty"):  # which one of the batch
        trained.ask_many(["fine", "   "], k=3)
    with pytest.raises(InvalidInput, match="^question is empty"):  # one question: no index to name
        trained.ask("   ")
    assert len(trained.log()) == logged  # a bad question in the batch: nothing asked, nothing logged


def test_a_long_batch_lets_other_callers_in_between_forward_passes(mem, memories_file, tiny_config):
    from ipm.engine import ASK_BATCH

    mem.config = tiny_config.updated(dtype="float32")  # batched and single passes agree to rounding
    mem.import_(memories_file)
    mem.train()
    trained = mem

    class CountingLock:
        def __init__(self, lock):
            self.lock, self.taken = lock, 0

        def __enter__(self):
            self.taken += 1
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    questions = [f"what is my dog called? ({i})" for i in range(2 * ASK_BATCH + 1)]
    single = [trained.ask(q, k=2) for q in questions[-2:]]
    trained._lock = CountingLock(trained._lock)
    batch = trained.ask_many(questions, k=2)
    assert trained._lock.taken == 3 and len(batch) == len(questions)
    assert [[h.id for h in a.candidates] for a in batch[-2:]] == [[h.id for h in a.candidates] for a in single]


def test_forget_takes_effect_at_once(trained, decoding):
    trained.reconfigure(decoding=decoding)
    trained.ask("warm up", k=1)  # the retrievers and trie exist before the forget
    trained.forget("personal_pet_max")
    for q in [MEMORIES["personal_pet_max"], "what is my dog called?", "Max"]:
        a = trained.ask(q, k=4)
        assert "personal_pet_max" not in [h.id for h in a.candidates + a.hits]
    with pytest.raises(NotFound):
        trained.get("personal_pet_max")


def test_forget_purges_the_text_and_questions_from_every_index_version(trained, home):
    import torch
    from safetensors.torch import load_file

    from ipm.engine import QUESTION_EMBEDDINGS, read_questions

    trained.train(full=True)  # two versions on disk
    root = home / "indexes" / "default"
    versions = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(versions) == 2
    before = {v: dict(zip(read_questions(v), load_file(str(v / QUESTION_EMBEDDINGS))["embeddings"])) for v in versions}
    text = MEMORIES["personal_pet_max"]
    assert all(text in (v / "questions.jsonl").read_text() for v in versions)
    trained.forget("personal_pet_max")
    for v in versions:
        assert text not in (v / "questions.jsonl").read_text() and "personal_pet_max" not in (v / "questions.jsonl").read_text()
        manifest = json.loads((v / "manifest.json").read_text())
        assert "personal_pet_max" not in manifest["ids"] and len(manifest["ids"]) == 3
        rows = read_questions(v)
        emb = load_file(str(v / QUESTION_EMBEDDINGS))["embeddings"]
        kept = {r: e for r, e in before[v].items() if r[1] != "personal_pet_max"}
        assert rows == list(kept) and len(emb) == len(rows)
        assert all(torch.equal(e, kept[r]) for r, e in zip(rows, emb))  # the others' rows stay aligned
        assert not [p for p in v.iterdir() if ".tmp-" in p.name]
    assert trained.status()["indexed"] == 3
    a = trained.ask(MEMORIES["work_job_acme"], k=4)
    assert "personal_pet_max" not in [h.id for h in a.candidates]
    # a version a purge could not finish (written back as it was) is purged by the next train
    (versions[0] / "questions.jsonl").write_text(
        "".join(json.dumps({"question": q, "memory_id": m}) + "\n" for q, m in before[versions[0]]))
    trained.add("My favourite food is sushi.")
    assert trained.train()["metrics"]["incremental"]  # the purged files still train incrementally
    assert text not in (versions[0] / "questions.jsonl").read_text()


def test_a_memory_forgotten_and_added_again_while_training_is_left_out_of_the_new_version(trained, home):
    from ipm.engine import read_questions

    old_text = MEMORIES["personal_pet_max"]
    trained.add("I keep my passport in the desk drawer.")
    done = []

    def progress(phase, *_):
        if phase == "train" and not done:  # the snapshot of the memories is taken; training runs
            done.append(1)
            trained.forget("personal_pet_max")
            trained.add("My dog is called Rex now.", id="personal_pet_max")
    manifest = trained.train(progress=progress)
    v = index_dir.current_dir(home / "indexes" / "default")
    assert manifest["version"] == v.name and "personal_pet_max" not in manifest["ids"]
    assert "personal_pet_max" not in json.loads((v / "manifest.json").read_text())["ids"]
    assert all(mid != "personal_pet_max" and old_text not in q for q, mid in read_questions(v))
    assert trained.untrained() == ["personal_pet_max"]  # learned, with its new text, at the next train
    assert trained.ask("Rex", k=4).candidates[0].id == "personal_pet_max"


def test_an_index_is_asked_with_the_prompt_it_was_trained_with(trained, home, tiny_config, tmp_path, monkeypatch):
    from ipm import search
    from ipm.model import LEGACY_PROMPT, PROMPT

    v = index_dir.current_dir(home / "indexes" / "default")
    manifest = json.loads((v / "manifest.json").read_text())
    assert manifest["prompt"] == PROMPT == "{question}\nMemory:"
    used = []
    real = search.prompt_ids
    monkeypatch.setattr(search, "prompt_ids", lambda tok, q, template=PROMPT: used.append(template) or real(tok, q, template))
    trained.ask("what is my dog called?")
    assert set(used) == {PROMPT}
    # an index trained before ipm recorded its prompt was trained with the one that began "Question: "
    del manifest["prompt"]
    (v / "manifest.json").write_text(json.dumps(manifest))
    used.clear()
    for decoding in ("hybrid", "pure"):
        old = ipm.open(home, config=tiny_config.updated(decoding=decoding), cache=tmp_path / "cache")
        old.ask("what is my dog called?")
        old.store.close()
    assert set(used) == {LEGACY_PROMPT} and len(used) >= 2
    # ... and is not continued by an incremental train, which would mix the two
    trained.add("I keep my passport in the desk drawer.")
    again = trained.train()
    assert again["metrics"]["full_because"] == "the current index was trained with an earlier prompt format"
    assert again["prompt"] == PROMPT


def test_a_forget_cut_short_is_finished_later_even_once_its_id_is_added_again(trained, home, monkeypatch):
    from ipm.engine import read_questions

    root = home / "indexes" / "default"
    text = MEMORIES["personal_pet_max"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(index_dir, "purge", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trained.forget("personal_pet_max")
    monkeypatch.undo()
    with pytest.raises(NotFound):
        trained.get("personal_pet_max")
    assert list(json.loads((root / ".forgotten-pending").read_text())) == ["personal_pet_max"]
    trained.add("My dog is called Rex now.", id="personal_pet_max")
    assert text in (index_dir.current_dir(root) / "questions.jsonl").read_text()  # not purged yet
    trained.forget("work_job_acme")  # any later purge (a forget, a train) finishes it
    for v in index_dir.versions(root):
        assert text not in (v / "questions.jsonl").read_text()
        assert all(mid != "personal_pet_max" for _, mid in read_questions(v))
    assert not (root / ".forgotten-pending").exists()
    with pytest.raises(NotFound):
        trained.forget("no_such_memory")
    assert not (root / ".forgotten-pending").exists()


def test_a_forget_the_store_fails_takes_back_only_its_own_pending_note(trained, home, monkeypatch):
    import sqlite3

    root = home / "indexes" / "default"
    pending = root / ".forgotten-pending"
    text = MEMORIES["personal_pet_max"]

    def locked_db(*a, **k):
        raise sqlite3.OperationalError("database is locked")
    with monkeypatch.context() as m:
        m.setattr(trained.store, "forget", locked_db)
        with pytest.raises(sqlite3.OperationalError):
            trained.forget("work_job_acme")
    assert trained.get("work_job_acme").text == MEMORIES["work_job_acme"]
    assert not pending.exists()  # kept in the store: its index files are left as they are
    hit = trained.ask(MEMORIES["work_job_acme"], k=4).candidates[0]
    assert (hit.id, hit.pending) == ("work_job_acme", False)

    # A forget cut short, its ID added again, then a second forget the store fails: the first
    # forget's note stays, so its old text is still purged by a later purge.
    with monkeypatch.context() as m:
        m.setattr(index_dir, "purge", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            trained.forget("personal_pet_max")
    trained.add("My dog is called Rex now.", id="personal_pet_max")
    with monkeypatch.context() as m:
        m.setattr(trained.store, "forget", locked_db)
        with pytest.raises(sqlite3.OperationalError):
            trained.forget("personal_pet_max")
    assert list(json.loads(pending.read_text())) == ["personal_pet_max"]
    trained.forget("work_job_acme")
    assert all(text not in (v / "questions.jsonl").read_text() for v in index_dir.versions(root))


def test_a_purge_leaves_a_forget_under_way_be_until_the_store_has_logged_it(trained, home):
    """A forget notes its ID before the store deletes the memory. A purge meanwhile (another
    process's forget or train) must not take a memory the store still holds out of the index,
    nor drop the note: the forget may fail, or be killed, or go on to finish."""
    from ipm.engine import read_questions

    root = home / "indexes" / "default"
    pending = root / ".forgotten-pending"
    text = MEMORIES["personal_pet_max"]
    # another process's forget, stopped between its note and the store's delete
    assert index_dir.remember_forgotten(root, "personal_pet_max", trained.store.generation("default"))
    trained.forget("work_job_acme")
    assert text in (index_dir.current_dir(root) / "questions.jsonl").read_text()
    assert "personal_pet_max" in json.loads((index_dir.current_dir(root) / "manifest.json").read_text())["ids"]
    assert list(json.loads(pending.read_text())) == ["personal_pet_max"]
    hit = trained.ask(text, k=4).candidates[0]
    assert (hit.id, hit.pending) == ("personal_pet_max", False)  # still indexed, still answered
    trained.store.forget("default", "personal_pet_max")  # that forget reaches the store, then dies
    trained.add("My dog is called Rex now.", id="personal_pet_max")
    trained.train()  # any later purge finishes it, though the ID was added again meanwhile
    for v in index_dir.versions(root):
        assert text not in (v / "questions.jsonl").read_text()
        assert not any(q == text for q, _ in read_questions(v))
    assert not pending.exists()


def test_a_forget_over_a_damaged_pending_list_forgets_and_says_what_is_left(trained, home):
    (home / "indexes" / "default" / ".forgotten-pending").write_text("garbage")
    with pytest.raises(IndexDamaged, match="'personal_pet_max' is forgotten from the store .* cannot be read .* "
                                           "run `ipm train`"):
        trained.forget("personal_pet_max")
    with pytest.raises(NotFound):
        trained.get("personal_pet_max")


def test_pending_notes_written_as_a_plain_list_still_count(tmp_path):
    root = tmp_path / "indexes" / "u"
    root.mkdir(parents=True)
    (root / ".forgotten-pending").write_text('["a_b_c"]')
    assert index_dir._read_pending(root) == {"a_b_c": None}
    (root / ".forgotten-pending").write_text('{"a_b_c": "soon"}')
    with pytest.raises(IndexDamaged, match="cannot be read"):
        index_dir._read_pending(root)
    (root / ".forgotten-pending").write_text('{"a_b_c": 100000000000000000000000}')  # past SQLite's integers
    with pytest.raises(IndexDamaged, match="cannot be read"):
        index_dir._read_pending(root)


def test_a_failed_forget_keeps_its_note_when_another_process_forgot_the_memory_meanwhile(trained, home, monkeypatch):
    import sqlite3

    root = home / "indexes" / "default"
    text = MEMORIES["personal_pet_max"]
    forget = trained.store.forget

    def meanwhile(namespace, memory_id):
        # Another process forgets it (and is killed before its purge), then it is added again;
        # this process's own delete then fails.
        forget(namespace, memory_id)
        trained.store.add(namespace, "My dog is called Rex now.", memory_id)
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(trained.store, "forget", meanwhile)
    with pytest.raises(sqlite3.OperationalError):
        trained.forget("personal_pet_max")
    monkeypatch.undo()
    assert list(json.loads((root / ".forgotten-pending").read_text())) == ["personal_pet_max"]
    trained.forget("work_job_acme")
    assert all(text not in (v / "questions.jsonl").read_text() for v in index_dir.versions(root))
    assert trained.get("personal_pet_max").text == "My dog is called Rex now."


def test_a_forget_goes_ahead_when_its_pending_note_cannot_be_written(trained, home, monkeypatch):
    from ipm.engine import read_questions

    write = index_dir._write_pending

    def full_disk(root, ids):
        if ids:
            raise OSError(28, "No space left on device")
        write(root, ids)  # removing the list needs no space
    monkeypatch.setattr(index_dir, "_write_pending", full_disk)
    trained.forget("personal_pet_max")
    with pytest.raises(NotFound):
        trained.get("personal_pet_max")
    a = trained.ask(MEMORIES["personal_pet_max"], k=4)
    assert "personal_pet_max" not in [h.id for h in a.hits + a.candidates]
    for v in index_dir.versions(home / "indexes" / "default"):
        assert all(mid != "personal_pet_max" for _, mid in read_questions(v))


def test_a_forgotten_id_added_again_is_not_answered_by_what_the_index_learned_of_it(trained, home, tiny_config,
                                                                                    tmp_path):
    other = ipm.open(home, config=tiny_config, cache=tmp_path / "cache")  # another process serving it
    for m in (trained, other):
        assert m.ask(MEMORIES["personal_pet_max"], k=4).candidates[0].id == "personal_pet_max"
    trained.forget("personal_pet_max")
    trained.add("My dog is called Rex now.", id="personal_pet_max")
    for m in (trained, other):
        a = m.ask(MEMORIES["personal_pet_max"], k=4)
        # the adapter's ranking no longer holds it; only the words of its new text can find it
        assert all(h.pending for h in a.hits + a.candidates if h.id == "personal_pet_max")
        assert "personal_pet_max" not in m._serving["default"].indexed
        assert m.untrained() == ["personal_pet_max"]
    assert [h.id for h in other.ask("Rex", k=4).hits if h.pending] == ["personal_pet_max"]
    other.store.close()


def test_a_reconfigured_engine_still_drops_an_id_forgotten_and_added_again(trained, home, tiny_config, tmp_path):
    # An index trained before manifests recorded their store generation.
    manifest = index_dir.current_dir(home / "indexes" / "default") / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["store_generation"]
    manifest.write_text(json.dumps(data))
    other = ipm.open(home, config=tiny_config, cache=tmp_path / "cache")
    assert other.ask(MEMORIES["personal_pet_max"], k=4).candidates[0].id == "personal_pet_max"
    trained.forget("personal_pet_max")
    trained.add("My dog is called Rex now.", id="personal_pet_max")
    other.reconfigure(beam_size=other.config.beam_size + 1)
    a = other.ask(MEMORIES["personal_pet_max"], k=4)
    assert all(h.pending for h in a.hits + a.candidates if h.id == "personal_pet_max")
    assert "personal_pet_max" not in other._serving["default"].indexed
    other.store.close()


def test_a_new_version_never_takes_the_name_of_the_one_served(tmp_path):
    root = tmp_path / "indexes" / "u"
    root.mkdir(parents=True)
    for name in ("v0001", "v0002"):
        (root / name).mkdir()
    (root / "CURRENT").write_text("v0003")  # its directory deleted by hand
    name, tmp = index_dir.new_version(root)
    assert name == "v0004" and tmp.name.startswith("v0004.tmp-")
    index_dir.abandon(tmp)


def fake_version(root, name, rows, dim=4):
    """An index version's files as train writes them (questions, their embeddings, manifest)."""
    import torch
    from safetensors.torch import save_file

    v = root / name
    v.mkdir(parents=True)
    (v / "questions.jsonl").write_text("".join(json.dumps({"question": q, "memory_id": m}, ensure_ascii=False) + "\n"
                                               for q, m in rows), encoding="utf-8")
    emb = torch.arange(len(rows) * dim, dtype=torch.float16).reshape(len(rows), dim)
    save_file({"embeddings": emb}, str(v / "question_embeddings.safetensors"), metadata={"encoder": "x"})
    ids = list(dict.fromkeys(m for _, m in rows))
    save_file({"embeddings": torch.arange(len(ids) * dim, dtype=torch.float32).reshape(len(ids), dim)},
              str(v / "text_embeddings.safetensors"),
              metadata={"encoder": "x", "ids": json.dumps(ids), "sha256": json.dumps(["h"] * len(ids))})
    (v / "manifest.json").write_text(json.dumps({"version": name, "ids": {m: "h" for _, m in rows},
                                                 "base_model": {}, "config": {}, "metrics": {}}))
    return v, emb


def test_purge_keeps_line_separators_finishes_a_failed_purge_and_names_a_damaged_version(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ipm.engine import read_questions
    from ipm.errors import IndexDamaged

    root = tmp_path / "indexes" / "u"
    rows = [("Notes\u2028with a line separator", "note_keep_one"), ("my pin is 4812", "personal_pin_secret"),
            ("Q about\u2029paragraphs\x85", "note_keep_one"), ("what is my pin?", "personal_pin_secret")]
    v1, emb = fake_version(root, "v0001", rows)
    v2, _ = fake_version(root, "v0002", rows[:2])
    both = lambda: {"note_keep_one", "personal_pin_secret"}  # noqa: E731  the store's memories
    assert index_dir.purge(root, both) == []  # nothing forgotten
    # forgotten, and already added again under the same ID: its old rows go all the same
    assert index_dir.purge(root, both, frozenset({"personal_pin_secret"})) == ["v0001", "v0002"]
    assert read_questions(v1) == [rows[0], rows[2]] and read_questions(v2) == [rows[0]]
    assert torch_equal(load_file(str(v1 / "question_embeddings.safetensors"))["embeddings"], emb[[0, 2]])
    assert json.loads((v1 / "manifest.json").read_text())["ids"] == {"note_keep_one": "h"}
    assert "4812" not in (v1 / "questions.jsonl").read_text() + (v2 / "questions.jsonl").read_text()
    for v in (v1, v2):  # the forgotten text's embedding goes too
        with safe_open(str(v / "text_embeddings.safetensors"), framework="pt") as f:
            assert json.loads(f.metadata()["ids"]) == ["note_keep_one"] and f.metadata()["encoder"] == "x"
            assert json.loads(f.metadata()["sha256"]) == ["h"]
            assert torch_equal(f.get_tensor("embeddings"), torch.tensor([[0.0, 1, 2, 3]]))
    assert sorted(p.name for p in v1.iterdir()) == ["manifest.json", "question_embeddings.safetensors",
                                                    "questions.jsonl", "text_embeddings.safetensors"]  # no temporary file left
    assert index_dir.purge(root, lambda: {"note_keep_one"}) == []  # done: the next purge finds nothing
    v3, _ = fake_version(root, "v0003", rows[:2])  # e.g. a purge that could not finish
    assert index_dir.purge(root, lambda: {"note_keep_one"}) == ["v0003"]
    (v3 / "questions.jsonl").write_text("not json\n")
    with pytest.raises(IndexDamaged, match="v0003 could not be purged"):
        index_dir.purge(root, set)
    (v3 / "questions.jsonl").write_text('[1, 2]\n')
    with pytest.raises(IndexDamaged, match="TypeError"):
        index_dir.purge(root, set)
    fake_version(root, "v0004", rows[:2])[0].joinpath("question_embeddings.safetensors").write_bytes(b"damaged")
    (v3 / "questions.jsonl").unlink()
    v5, _ = fake_version(root, "v0005", rows[:2])
    with pytest.raises(IndexDamaged, match="v0004"):
        index_dir.purge(root, lambda: {"note_keep_one"})
    assert read_questions(v5) == [rows[0]]  # one version that cannot be purged does not hold up the others
    shutil.rmtree(root / "v0004")
    shutil.rmtree(v5)
    (v3 / "manifest.json").write_text('{"ids": {')  # what to do is said, and is enough
    (v3 / "questions.jsonl").write_text("".join(json.dumps({"question": q, "memory_id": m}) + "\n" for q, m in rows))
    with pytest.raises(IndexDamaged, match="v0003 cannot be read .*: delete that directory and run `ipm train`"):
        index_dir.purge(root, lambda: {"note_keep_one"})
    assert "4812" not in (v3 / "questions.jsonl").read_text()  # the texts it can purge, it does
    shutil.rmtree(v3)
    assert index_dir.purge(root, lambda: {"note_keep_one"}) == []
    # A purge that failed is finished by the next one even where the ID was added again meanwhile
    shutil.rmtree(v1)
    shutil.rmtree(v2)
    v6, _ = fake_version(root, "v0006", rows)
    (v6 / "questions.jsonl").write_text("not json\n")
    with pytest.raises(IndexDamaged, match="v0006"):
        index_dir.purge(root, both, frozenset({"personal_pin_secret"}))
    assert json.loads((root / ".forgotten-pending").read_text()) == {"personal_pin_secret": None}
    shutil.rmtree(v6)
    v6, _ = fake_version(root, "v0006", rows)  # repaired (as it was): the pin is in the store again
    assert index_dir.purge(root, both) == ["v0006"]
    assert read_questions(v6) == [rows[0], rows[2]] and not (root / ".forgotten-pending").exists()
    assert index_dir.purge(root, both) == []  # and nothing is remembered once done


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_forget_by_another_process_is_honoured(trained, home, tiny_config, tmp_path):
    trained.ask("warm up", k=1)
    other = ipm.open(home, config=tiny_config, cache=tmp_path / "cache")
    other.forget("work_job_acme")
    a = trained.ask(MEMORIES["work_job_acme"], k=4)
    assert "work_job_acme" not in [h.id for h in a.candidates]


def test_namespaces_never_leak(mem, tmp_path, decoding):
    mem.reconfigure(decoding=decoding)
    shared = "My dog's name is Max and he is a beagle."
    mem.add(shared, id="personal_pet_max", user="alice")
    mem.add("Alice's secret: the safe code is 1234.", id="personal_safe_code", user="alice")
    mem.add(shared, id="personal_pet_max", user="bob")
    mem.add("Bob is allergic to peanuts.", id="health_allergy_peanuts", user="bob")
    mem.train(user="alice")
    mem.train(user="bob")
    for q in ["safe code", "what is my dog called?", "peanuts", shared]:
        for user, own in (("alice", {"personal_pet_max", "personal_safe_code"}),
                          ("bob", {"personal_pet_max", "health_allergy_peanuts"})):
            a = mem.ask(q, k=4, user=user)
            assert {h.id for h in a.candidates + a.hits} <= own
            for h in a.candidates:
                assert h.text == mem.get(h.id, user=user).text
    assert mem.ask("safe code 1234", k=4, user="carol").hits == []


def test_each_namespace_is_scored_by_its_own_adapter_across_switches(mem, home, tiny_config, tmp_path, decoding):
    """One process serving two namespaces switches adapters only when the other one is active:
    a namespace's scores are the same before and after the other is asked, and the same as in a
    process that serves it alone."""
    mem.reconfigure(decoding=decoding)
    for user in ("alice", "bob"):
        for mid, text in MEMORIES.items():
            mem.add(text if user == "alice" else text[::-1], id=mid, user=user)
        mem.train(user=user)
    q = MEMORIES["family_sister_anna"]

    def scores(engine, user):
        return [(h.id, h.score) for h in engine.ask(q, k=4, user=user).candidates]

    first = scores(mem, "alice")
    bob = scores(mem, "bob")
    assert scores(mem, "alice") == first and scores(mem, "bob") == bob
    assert first != bob  # the adapters differ, so serving the wrong one would show
    alone = ipm.open(home, config=tiny_config.updated(decoding=decoding), cache=tmp_path / "cache")
    assert scores(alone, "alice") == first
    alone.store.close()


def test_interrupted_training_keeps_the_previous_index(trained, home, monkeypatch):
    import ipm.engine as engine

    def boom(*a, **k):
        raise KeyboardInterrupt

    before = trained.ask(MEMORIES["family_sister_anna"], k=1)
    monkeypatch.setattr(engine, "calibrate", boom)
    with pytest.raises(KeyboardInterrupt):
        trained.train(full=True)
    root = home / "indexes" / "default"
    assert index_dir.current_dir(root).name == "v0001"
    assert not list(root.glob("*.tmp-*"))
    after = trained.ask(MEMORIES["family_sister_anna"], k=1)
    assert [h.id for h in after.candidates] == [h.id for h in before.candidates]


def test_retraining_makes_a_new_current_version(trained, home):
    trained.add("My favourite food is sushi.", id="food_favorite_sushi")
    manifest = trained.train()
    assert manifest["version"] == "v0002" and "food_favorite_sushi" in manifest["ids"]
    assert index_dir.current_dir(home / "indexes" / "default").name == "v0002"


def test_a_train_keeps_the_newest_versions_and_deletes_the_older(home, memories_file, tiny_config, tmp_path,
                                                                request):
    trained = ipm.open(home, config=tiny_config.updated(keep_versions=2, epochs=2, also_calibrate=[]),
                       cache=tmp_path / "cache")
    request.addfinalizer(trained.store.close)
    trained.import_(memories_file)
    root = home / "indexes" / "default"
    trained.train()
    trained.train(full=True)
    assert [v.name for v in index_dir.versions(root)] == ["v0001", "v0002"]
    trained.add("My favourite food is sushi.", id="food_favorite_sushi")
    trained.train()
    assert [v.name for v in index_dir.versions(root)] == ["v0002", "v0003"]
    assert not list(root.glob("*.tmp-*"))
    event = [e for e in trained.log() if e.action == "train"][-1]
    assert event.detail["removed_versions"] == ["v0001"] and event.detail["version"] == "v0003"
    assert event.detail["examples"] > 0 and event.detail["path"] == "indexes/default/v0003"
    assert trained.ask(MEMORIES["family_sister_anna"], k=1).candidates  # the new current version serves
    trained.add("My car is a blue Mazda 3.", id="transport_car_mazda")
    trained.train()  # incremental, from v0003
    assert [v.name for v in index_dir.versions(root)] == ["v0003", "v0004"]


def test_old_versions_are_retired_then_deleted_but_never_the_current_one(tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "indexes" / "u"
    for n in range(1, 6):
        fake_version(root, f"v000{n}", [("q", "note_a_b")])
    (root / "CURRENT").write_text("v0002")  # set back by hand to an older version
    retired = index_dir.retire(root, 2)
    assert list(retired) == ["v0001", "v0003"]
    assert [v.name for v in index_dir.versions(root)] == ["v0002", "v0004", "v0005"]  # moved out of the way
    index_dir.delete_retired(retired)
    assert index_dir.current_dir(root).name == "v0002" and not list(root.glob("*.tmp-*"))
    assert index_dir.retire(root, 2) == {}
    (root / "CURRENT").write_text("v0005")  # a train made v0005 current, replacing v0004
    index_dir.delete_retired(index_dir.retire(root, 1, also_keep=root / "v0004"))
    assert [v.name for v in index_dir.versions(root)] == ["v0004", "v0005"]
    # a version that cannot be deleted is named, not passed over in silence
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    retired = index_dir.retire(root, 1)
    with pytest.warns(UserWarning, match="v0004 could not be deleted"):
        index_dir.delete_retired(retired)


def test_pure_decoding_trains_without_the_dense_model(home, memories_file, tiny_config, tmp_path, monkeypatch,
                                                      request):
    import ipm.engine

    def missing():
        raise ModelError("dense retrieval needs `pip install sentence-transformers`")
    monkeypatch.setattr(ipm.engine, "load_dense_encoder", missing)
    monkeypatch.setattr("ipm.retrieve.load_dense_encoder", missing)
    m = ipm.open(home, config=tiny_config.updated(decoding="pure", also_calibrate=[], epochs=2),
                 cache=tmp_path / "cache")
    request.addfinalizer(m.store.close)
    m.import_(memories_file)
    assert set(m.train()["ids"]) == set(MEMORIES)
    assert m.ask(MEMORIES["personal_pet_max"], k=1).candidates
    m.reconfigure(decoding="hybrid", abstain_threshold=0.0)
    with pytest.raises(ModelError, match="sentence-transformers"):
        m.ask(MEMORIES["personal_pet_max"], k=1)


def test_memory_added_after_training_is_pending_until_retrained(trained):
    trained.add("My car is a blue Mazda 3.", id="transport_car_mazda")
    a = trained.ask("which car do I drive? mazda", k=3)
    pending = [h for h in a.hits if h.pending]
    assert pending and pending[0].id == "transport_car_mazda"
    assert trained.status()["pending"] == 1 and trained.status()["changed"] == 0
    trained.update("personal_pet_max", "My dog's name is Rex now.")  # in the index, under its old text
    assert (trained.status()["pending"], trained.status()["changed"], trained.status()["indexed"]) == (1, 1, 4)
    assert trained.untrained() == ["personal_pet_max", "transport_car_mazda"]


def test_a_pending_memory_comes_first_only_where_it_is_closer_to_the_question():
    """A memory added since training shares every word of "what's my dog's name?" but is about
    the neighbour's dog: the index's confident answer stays first. One on a new subject comes
    first. Under hybrid decoding MiniLM's cosines can veto what the word share says."""
    from types import SimpleNamespace

    from ipm.engine import IPM, Hit, _Serving
    from ipm.retrieve import load_dense_encoder

    s = _Serving(candidates=SimpleNamespace(dense=SimpleNamespace(encoder=load_dense_encoder())))
    questions = ["what's my dog's name?", "what's my wifi password?", "where does Anna live?"]
    ranked = [[Hit("personal_pet_max", "My dog's name is Max and he is a beagle.", 0.99)],
              [Hit("personal_car_mazda", "My car is a blue Mazda 3.", 0.7)],
              [Hit("family_sister_anna", "My sister Anna lives in Berlin.", 0.9)]]
    pending = [[Hit("home_neighbor_rex", "My neighbour's dog's name is Rex.", 1.0, pending=True)],
               [Hit("home_wifi_password", "My wifi password is hunter2-blue.", 1.0, pending=True)], []]
    closer = IPM._pending_closer(questions, ranked, pending, s)
    assert closer == [False, True, None]
    answers = [IPM._answer(q, h, p, 0.1, 2, c) for q, h, p, c in zip(questions, ranked, pending, closer)]
    assert [[h.id for h in a.hits] for a in answers] == [["personal_pet_max", "home_neighbor_rex"],
                                                         ["home_wifi_password", "personal_car_mazda"],
                                                         ["family_sister_anna"]]
    # The cosine only vetoes: a pending memory closer to a paraphrased question than the right
    # answer's text, but sharing less of its words than the answer's probability, stays after it.
    paraphrased = ["What's my furry friend called?"]
    furry = [[Hit("personal_pet_max", "My dog's name is Max and he is a beagle.", 0.99)]]
    coat = [[Hit("family_friend_coat", "My friend Anna bought a furry coat.", 0.67, pending=True)]]
    assert IPM._pending_closer(paraphrased, furry, coat, s) == [None]  # not measured: it cannot come first
    assert [h.id for h in IPM._answer(paraphrased[0], furry[0], coat[0], 0.1, 2).hits] == [
        "personal_pet_max", "family_friend_coat"]
    # Where the index abstains, the pending memory answers; pure decoding (nothing measured)
    # weighs its word share against the index's probability.
    assert [h.id for h in IPM._answer(questions[0], ranked[0], pending[0], 0.995, 2, False).hits] == [
        "home_neighbor_rex"]
    assert IPM._pending_closer(questions, ranked, pending, _Serving()) == [None, None, None]
    assert [h.id for h in IPM._answer(questions[0], ranked[0], pending[0], 0.1, 2).hits][0] == "home_neighbor_rex"


def test_untrained_memories_are_read_once_a_change_not_on_every_ask(trained, monkeypatch):
    for i in range(20):
        trained.add(f"Receipt number {i} from the hardware store.", id=f"note_receipt_n{i}")
    trained.add("My car is a blue Mazda 3.", id="transport_car_mazda")
    trained.ask("which car do I drive?", k=1)  # reads the changes
    asked = []
    get_many = trained.store.get_many
    monkeypatch.setattr(trained.store, "get_many", lambda user, ids: asked.append(list(ids)) or get_many(user, ids))
    a = trained.ask("which car do I drive? mazda", k=2)
    assert [h.id for h in a.hits if h.pending] == ["transport_car_mazda"]
    assert max(map(len, asked)) <= 2  # the hits' texts, not the 21 untrained memories'
    trained.update("transport_car_mazda", "My car is a red Honda Civic.")
    a = trained.ask("which car do I drive? honda", k=2)
    assert [(h.id, h.text) for h in a.hits if h.pending] == [("transport_car_mazda", "My car is a red Honda Civic.")]


def test_training_says_so_where_abstention_will_refuse_nothing(mem, memories_file, tiny_config):
    """Calibration falls back to a threshold of 0 where nothing was held back to calibrate on
    (8 questions a memory, a tenth held back: none) or where one memory gets every question:
    a warning says so, and how to set one; a threshold set by hand is not warned about."""
    from ipm.errors import IPMWarning

    mem.config = tiny_config.updated(also_calibrate=[])
    mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max")
    with pytest.warns(IPMWarning, match="will refuse no question: no generated question was held back .* "
                                        "questions_per_memory, 8 here"):
        manifest = mem.train()
    assert manifest["threshold"] == 0.0 and manifest["metrics"]["calibration"]["hybrid"]["n_in_scope"] == 0
    mem.config = tiny_config.updated(also_calibrate=["pure"])  # each decoding calibrated is said
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        mem.train(full=True)
    assert {m for m in ("hybrid", "pure") for w in said if f"abstention ({m} decoding) will refuse no" in str(w.message)} \
        == {"hybrid", "pure"}
    mem.config = tiny_config.updated(also_calibrate=[], questions_per_memory=30)
    with pytest.warns(IPMWarning, match="will refuse no question: with one memory, every question goes to it"):
        mem.train(full=True)
    mem.config = tiny_config.updated(also_calibrate=[], abstain_threshold=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IPMWarning)
        mem.train(full=True)


def test_abstains_below_threshold(mem, memories_file, tiny_config):
    mem.config = tiny_config.updated(abstain_threshold=1.01)
    mem.import_(memories_file)
    mem.train()
    a = mem.ask("what is my dog called?", k=3)
    assert a.abstained and a.hits == [] and a.to_dict()["hits"] == []


def test_naive_training_path_also_works(mem, memories_file, tiny_config):
    from ipm.train import train_adapter

    base = mem.base()
    result = train_adapter(base, [Example(t, m) for m, t in MEMORIES.items()], tiny_config.updated(epochs=2), fast=False)
    assert result.metrics["path"] == "naive" and result.metrics["trained_layers"] == 4
    with pytest.raises(TrainingError, match="hard negatives need the fast"):
        train_adapter(base, [Example(t, m) for m, t in MEMORIES.items()], tiny_config.updated(hard_negatives=2),
                      fast=False)


def test_an_index_trained_in_float32_is_served_in_float32_and_a_retrain_matches_the_served_copy(
        home, mem, memories_file, tiny_config, tmp_path):
    """Its abstention threshold was calibrated on float32 scores: with dtype "auto" it is served
    in float32; a dtype set explicitly wins; a retrain in a serving process trains on the copy
    it serves; an index whose manifest names no dtype is served in "auto"'s choice."""
    import torch

    from ipm.model import pick_dtype

    mem.config = tiny_config.updated(dtype="float32")
    mem.import_(memories_file)
    mem.train()
    mem.store.close()
    for dtype, served in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        reopened = ipm.open(home, config=tiny_config.updated(dtype=dtype), cache=tmp_path / "cache")
        try:
            assert reopened.ask("what is my dog called?", k=1).candidates
            assert next(reopened._base.model.parameters()).dtype == served
            if dtype == "auto":
                reopened.add("My cat is called Tom.", id="personal_pet_tom")
                manifest = reopened.train()
                assert manifest["metrics"]["dtype"] == "float32"
                assert reopened.ask("what is my cat called?", k=1).candidates
        finally:
            reopened.store.close()
    version = home_version(mem)
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["metrics"]["dtype"]  # as written before the dtype was recorded
    (version / "manifest.json").write_text(json.dumps(manifest))
    reopened = ipm.open(home, config=tiny_config, cache=tmp_path / "cache")
    try:
        assert reopened.ask("what is my dog called?", k=1).candidates
        assert next(reopened._base.model.parameters()).dtype == pick_dtype(tiny_config, "cpu")
    finally:
        reopened.store.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_base_model_dtype_is_configurable_and_lora_trains_in_float32(mem, memories_file, tiny_config, dtype):
    import torch

    mem.config = tiny_config.updated(dtype=dtype)
    assert next(mem.base().model.parameters()).dtype == getattr(torch, dtype)
    mem.import_(memories_file)
    manifest = mem.train()
    assert manifest["config"]["dtype"] == dtype
    from safetensors.torch import load_file

    version = home_version(mem)
    assert {t.dtype for t in load_file(version / "adapter_model.safetensors").values()} == {torch.float32}
    assert mem.ask("what is my dog called?", k=3).candidates[0].id in MEMORIES
    with pytest.raises(InvalidInput, match="dtype"):
        tiny_config.updated(dtype="float8")


def test_a_bf16_base_trains_its_lora_path_in_bf16_and_keeps_float32_adapter_weights(mem, tiny_config, monkeypatch):
    """On a bf16 base the adapter's matmuls run under autocast with PEFT's input casting off
    during training only; the weights the optimiser updates stay float32, and the loss falls."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ipm.train import train_adapter

    mem.config = tiny_config.updated(dtype="bfloat16")
    base = mem.base()
    seen = []
    original = BaseTunerLayer._cast_input_dtype

    def spy(self, x, dtype):
        seen.append(getattr(self, "cast_input_dtype_enabled", True))
        return original(self, x, dtype)

    monkeypatch.setattr(BaseTunerLayer, "_cast_input_dtype", spy)
    result = train_adapter(base, [Example(t, m) for m, t in MEMORIES.items()], tiny_config.updated(epochs=8))
    assert seen and not any(seen)  # every LoRA forward in training ran without the float32 cast
    layers = [m for m in result.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)  # restored for serving
    assert {p.dtype for n, p in result.model.named_parameters() if "lora_" in n} == {torch.float32}
    assert result.metrics["loss_last"] < result.metrics["loss_first"]


def home_version(mem):
    return index_dir.current_dir(mem.paths.index_root("default"))


def test_train_needs_memories(mem):
    with pytest.raises(TrainingError, match="no memories"):
        mem.train()


def test_update_changes_the_answer_text_without_retraining(trained):
    trained.update("personal_pet_max", "My dog's name is Max; he turned 5 in May.")
    a = trained.ask(MEMORIES["personal_pet_max"], k=4)
    texts = {h.id: h.text for h in a.candidates}
    assert texts.get("personal_pet_max", "My dog's name is Max; he turned 5 in May.") == "My dog's name is Max; he turned 5 in May."
    assert [v["version"] for v in trained.history("personal_pet_max")] == [1, 2]


# -- import --------------------------------------------------------------------------------

def test_import_jsonl_records_and_training_questions(mem, tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"text": "My dog\'s name is Max."}\n\n{"id": "health_allergy_penicillin", "text": "I\'m allergic to penicillin.", "questions": ["Which antibiotic must I avoid?"]}\n')
    f.write_text(f.read_text().replace('"questions": ["Which antibiotic must I avoid?"]',
                                       '"questions": ["Which antibiotic must I avoid?", "Which antibiotic must I avoid?"]'))
    r = mem.import_(f)
    assert r.memories == 2 and r.ids == ["personal_pet_max", "health_allergy_penicillin"]
    assert r.questions == 1  # given with its memory, twice: stored and counted once
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"question": "What's my dog called?", "memory_id": "personal_pet_max"}]))
    assert mem.import_(q).questions == 1
    assert mem.get("personal_pet_max").questions == ["What's my dog called?"]


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": ""}\n', "line 2: .*empty"),
    ('{"text": "ok"}\nnot json\n', "line 2 is not valid JSON"),
    ('[{"text": "ok"}, {"id": "Bad", "text": "x"}]', "index 1: .*malformed"),
    ('{"personal_pet_max": "ok", "bad": "x"}', "key 'bad'"),
    ('[{"question": "q?", "memory_id": "note_missing_id"}]', "no memory 'note_missing_id'"),
    ('[{"text": "ok", "colour": "red"}]', "unknown field"),
    ('[{"text": "ok", "sha256": 5}]', "index 0: sha256 must be a string"),
    ('[{"text": "\\ud800", "sha256": "00"}]', "index 0: .*not valid Unicode"),
    ('[{"text": "ok", "sha256": "00"}]', "index 0: its sha256 is not that of its text"),
    ('[{"question": "q?", "memory_id": "personal_pet_max", "colour": "red"}]', "index 0: unknown field"),
    ('[]', "no records"),
    ('{"personal_pet_max": "one", "personal_pet_max": "two"}', "key 'personal_pet_max' is given twice"),
    ('{"text": "ok"}\n{"text": "a", "text": "b"}\n', "line 2: key 'text' is given twice"),
    ('[\n  {"text": "ok"},\n  {"text": oops}\n]\n', "not valid JSON: Expecting value at line 3, column 12"),
    ('{"id": "note_one_two", "text": "a"}\n{"id": "note_one_two", "text": "b"}\n',
     "bad.json: line 2: memory ID 'note_one_two' is given twice in this input \\(also line 1\\)"),
])
def test_bad_import_names_the_record_and_writes_nothing(mem, tmp_path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises((InvalidInput, NotFound), match=match):
        mem.import_(f)
    assert mem.list() == []


def test_import_reads_one_line_of_json_lines_line_separators_and_a_byte_order_mark(mem, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "My dog is called Rex."}\n')  # one record, not an {"id": "text"} document
    assert mem.import_(one).memories == 1
    texts = ["Notes\u2028with a line separator\u2029and a paragraph one\x85inside.", "Second memory about cats."]
    lines = tmp_path / "sep.jsonl"
    lines.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert mem.import_(lines).memories == 2
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "A file saved with a BOM."}]).encode())
    assert mem.import_(bom).memories == 1
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b'{"text": "Saved on Windows."}\r\n{"text": "Line two."}\r\n')
    assert mem.import_(crlf).memories == 2
    assert mem.import_text('\ufeff{"text": "Pasted with a BOM."}').memories == 1  # as POST /import takes it
    assert sorted(m.text for m in mem.list()) == sorted(["My dog is called Rex.", *texts, "A file saved with a BOM.",
                                                         "Saved on Windows.", "Line two.", "Pasted with a BOM."])


def test_ask_without_any_index_or_memory_abstains(mem):
    a = mem.ask("anything?")
    assert a.abstained and a.hits == []
    with pytest.raises(IndexMissing):
        index_dir.read_manifest(mem.paths.index_root("default"))


def test_both_decodings_are_calibrated_and_switchable(trained):
    manifest = index_dir.read_manifest(trained.paths.index_root("default"))
    assert set(manifest["metrics"]["calibration"]) == {"pure", "hybrid"}
    for decoding in ("pure", "hybrid", "pure"):
        trained.reconfigure(decoding=decoding)
        a = trained.ask(MEMORIES["family_sister_anna"], k=4)
        assert (a.candidates[0].signals is None) == (decoding == "pure")
        assert sum(h.score for h in a.candidates) == pytest.approx(1.0, abs=1e-4)


def test_hybrid_without_fusion_gives_the_adapter_probabilities(trained):
    """With every memory a candidate and no retriever weight, hybrid decoding must rank by
    exactly the probabilities of pure decoding (both are exhaustive over 4 IDs)."""
    trained.reconfigure(decoding="pure", beam_size=8)
    for q in ["what is my dog called?", "where does my sister live", "penicillin"]:
        pure = {h.id: h.score for h in trained.ask(q, k=4).candidates}
        trained.reconfigure(decoding="hybrid", hybrid_candidates=10, fusion_adapter=1.0, fusion_dense=0.0,
                            fusion_bm25=0.0)
        hybrid = {h.id: h.score for h in trained.ask(q, k=4).candidates}
        trained.reconfigure(decoding="pure")
        assert set(pure) == set(hybrid) == set(MEMORIES)
        for mid in pure:
            assert hybrid[mid] == pytest.approx(pure[mid], rel=1e-3, abs=1e-6)


def test_hybrid_candidates_come_from_the_retrievers(trained):
    """With one candidate per retriever, only what BM25 or dense retrieval proposed is ranked."""
    trained.reconfigure(decoding="hybrid", hybrid_candidates=1)
    a = trained.ask("Which company do I work for as a data engineer at Acme Corp?", k=4)
    assert 1 <= len(a.candidates) <= 2
    assert "work_job_acme" in {h.id for h in a.candidates}
    for h in a.candidates:
        assert -100 < h.signals.lora <= 0 and -1 <= h.signals.dense <= 1 and h.signals.bm25 >= 0


def test_a_threshold_calibrated_under_other_fusion_settings_is_flagged(trained):

    manifest = index_dir.read_manifest(trained.paths.index_root("default"))
    assert manifest["metrics"]["calibration"]["hybrid"]["fusion"]["fusion_bm25_floor"] == trained.config.fusion_bm25_floor
    trained.reconfigure(decoding="hybrid")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as trained: nothing to say
        trained.ask("what is my dog called?")
    configured = trained.config.fusion_dense
    try:
        trained.reconfigure(fusion_dense=configured + 1)
        said = f"calibrated with fusion_dense {configured}, but asked with fusion_dense {configured + 1}; .*ipm.toml"
        with pytest.warns(UserWarning, match=said):
            trained.ask("what is my dog called?")
    finally:
        trained.reconfigure(fusion_dense=configured)


def test_an_index_calibrated_before_bm25_noise_existed_ran_without_it(trained):

    from ipm.engine import CALIBRATED_OPTIONS

    configured = trained.config.fusion_bm25_noise
    trained.ask("what is my dog called?")  # the base model is loaded: quantize is recorded as it resolves
    now = trained._calibrated_settings(trained._base)
    old = {"fusion": {k: now[k] for k in CALIBRATED_OPTIONS if k != "fusion_bm25_noise"}}
    try:
        trained.reconfigure(fusion_bm25_noise=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            trained._warn_if_calibrated_elsewise("default", old)  # the same settings: nothing to say
        trained.reconfigure(fusion_bm25_noise=3.0)
        with pytest.warns(UserWarning, match="fusion_bm25_noise 0.0"):
            trained._warn_if_calibrated_elsewise("default", old)
    finally:
        trained.reconfigure(fusion_bm25_noise=configured)


def test_an_index_calibrated_before_the_rerank_or_any_record_warns_only_where_it_should(trained):
    from ipm.engine import CALIBRATED_OPTIONS, RERANK_OPTIONS

    trained.ask("what is my dog called?")  # the base model is loaded: quantize is recorded as it resolves
    now = trained._calibrated_settings(trained._base)
    before_rerank = {"fusion": {k: now[k] for k in CALIBRATED_OPTIONS if k not in RERANK_OPTIONS}}
    try:
        # With the rerank off, the number of candidates it would read changes no score.
        trained.reconfigure(rerank_candidates=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            trained._warn_if_calibrated_elsewise("default", before_rerank)
        trained.reconfigure(rerank_likelihood=1.0)
        with pytest.warns(UserWarning, match="rerank_likelihood 0.0"):
            trained._warn_if_calibrated_elsewise("default", before_rerank)
    finally:
        trained.reconfigure(rerank_likelihood=0.0, rerank_candidates=6)
    with pytest.warns(UserWarning, match="did not record"):  # an index from before any record
        trained._warn_if_calibrated_elsewise("default", {"threshold": 0.5})


def test_hybrid_scores_fuse_the_signals_with_the_configured_bm25_floor_and_noise(trained):
    from ipm.search import fuse

    q = "Which company do I work for as a data engineer?"
    scores, configured = {}, (trained.config.fusion_bm25_floor, trained.config.fusion_bm25_noise)
    try:
        for floor, noise in ((0.0, 0.0), (1000.0, 0.0), (0.0, 1000.0)):
            trained.reconfigure(decoding="hybrid", fusion_bm25_floor=floor, fusion_bm25_noise=noise)
            a = trained.ask(q, k=10)
            assert max(h.signals.bm25 for h in a.candidates) > 0  # a BM25 match, so the floor and noise matter
            cfg = trained.config
            want = dict(fuse({h.id: h.signals for h in a.candidates}, cfg.fusion_dense, cfg.fusion_bm25,
                             cfg.fusion_adapter, floor, noise))
            scores[floor, noise] = {h.id: h.score for h in a.candidates}
            assert scores[floor, noise] == pytest.approx(want, rel=1e-6, abs=0)
    finally:
        trained.reconfigure(fusion_bm25_floor=configured[0], fusion_bm25_noise=configured[1])
    assert scores[0.0, 0.0] != pytest.approx(scores[1000.0, 0.0], rel=1e-3, abs=0)  # compared in ratio: tiny scores count
    assert scores[0.0, 0.0] != pytest.approx(scores[0.0, 1000.0], rel=1e-3, abs=0)


def test_rerank_orders_the_best_hybrid_candidates_by_the_base_models_likelihood(trained):
    from ipm.search import fuse, query_likelihood, rerank

    q = "Which company do I work for as a data engineer?"
    plain = trained.ask(q, k=10)
    assert all(h.signals.likelihood is None for h in plain.candidates)  # off by default
    try:
        trained.reconfigure(decoding="hybrid", rerank_likelihood=0.5, rerank_candidates=3)
        with pytest.warns(UserWarning, match="rerank_likelihood 0.0"):  # its threshold was calibrated without it
            a = trained.ask(q, k=10)
        cfg = trained.config
        signals = {h.id: h.signals for h in a.candidates}
        fused = fuse(signals, cfg.fusion_dense, cfg.fusion_bm25, cfg.fusion_adapter, cfg.fusion_bm25_floor,
                     cfg.fusion_bm25_noise)
        scored = [mid for mid, _ in fused[:3]]
        assert {h.id for h in a.candidates if h.signals.likelihood is not None} == set(scored)
        texts = {h.id: h.text for h in a.candidates}
        likelihood = dict(zip(scored, query_likelihood(trained._model, trained._base.tokenizer,
                                                       [(q, texts[mid]) for mid in scored])))
        assert {mid: signals[mid].likelihood for mid in scored} == pytest.approx(likelihood, abs=1e-3)
        want = rerank(fused, likelihood, 0.5)
        assert [h.id for h in a.candidates] == [mid for mid, _ in want]
        assert {h.id: h.score for h in a.candidates} == pytest.approx(dict(want), rel=1e-4, abs=1e-9)
        assert {h.id: h.score for h in a.candidates} != pytest.approx({h.id: h.score for h in plain.candidates},
                                                                      rel=1e-3, abs=0)
        for h in a.candidates:
            assert h.text == trained.get(h.id).text
        # The pure decoding has no candidates to rerank: the option does not touch it.
        trained.reconfigure(decoding="pure", abstain_threshold=0.0)
        on = [(h.id, h.score) for h in trained.ask(q, k=3).candidates]
        trained.reconfigure(rerank_likelihood=0.0)
        assert [(h.id, h.score) for h in trained.ask(q, k=3).candidates] == on
    finally:
        trained.reconfigure(decoding="hybrid", rerank_likelihood=0.0, rerank_candidates=6, abstain_threshold=None)
    with pytest.raises(InvalidInput, match="rerank_likelihood"):
        trained.reconfigure(rerank_likelihood=-1.0)
    with pytest.raises(InvalidInput, match="rerank_candidates"):
        trained.reconfigure(rerank_candidates=1)
    with pytest.raises(InvalidInput, match="whole base model"):
        ipm.Config(base_layers=15, rerank_likelihood=1.0).check()


def test_an_index_calibrated_with_the_rerank_serves_it_without_a_warning(mem, memories_file):
    mem.import_(memories_file)
    mem.reconfigure(rerank_likelihood=0.5)
    manifest = mem.train()
    assert manifest["metrics"]["calibration"]["hybrid"]["fusion"]["rerank_likelihood"] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = mem.ask("Which company do I work for as a data engineer?", k=3)
    assert any(h.signals.likelihood is not None for h in a.candidates)
    # Another number of reranked candidates is another calibration; with the rerank off it is not.
    mem.reconfigure(rerank_candidates=2)
    with pytest.warns(UserWarning, match="rerank_candidates 6"):
        mem.ask("Which company do I work for as a data engineer?")


def test_a_threshold_of_ones_own_can_be_set_back_to_the_calibrated_one():
    cfg = ipm.Config().updated(abstain_threshold=0.5)
    assert cfg.updated(abstain_threshold=None).abstain_threshold is None
    for bad in ("0.5", True):
        with pytest.raises(InvalidInput, match="abstain_threshold must be a number"):
            cfg.updated(abstain_threshold=bad)


@pytest.mark.parametrize("option,value,says", [
    ("epochs", 2.5, "whole number"), ("epochs", True, "whole number"), ("lora_r", "8", "whole number"),
    ("learning_rate", float("nan"), "a number"), ("fusion_dense", float("inf"), "a number"),
    ("expand_retrievers", 1, "true or false"), ("base_model", 5, "a string"), ("target_modules", "q_proj", "list"),
    ("target_modules", [], "at least one"), ("device", "tpu", "device must be"), ("threads", -3, "at least 0"),
    ("lora_layers", -2, "at least 0"), ("max_text_bytes", 0, "at least 1"), ("max_k", 0, "at least 1"),
    ("keep_versions", 1, "at least 2"),
    ("learning_rate", 0, "above 0"), ("abstain_threshold", -0.1, "at least 0"), ("abstain_threshold", "x", "number"),
])
def test_a_bad_config_value_is_refused_when_set_not_deep_in_training(option, value, says):
    with pytest.raises(InvalidInput, match=says):
        ipm.Config().updated(**{option: value})


def test_good_config_values_pass_and_whole_numbers_serve_as_floats():
    cfg = ipm.Config().updated(learning_rate=1, device="cuda:1", abstain_threshold=0, base_model=None)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float) and cfg.device == "cuda:1"
    assert cfg.abstain_threshold == 0 and cfg.updated(abstain_threshold=None).abstain_threshold is None


def test_k_is_bounded_by_max_k(trained):
    assert len(trained.ask("What is my dog called?", k=4).candidates) <= 4
    for k in (0, 101, 2.0, True):
        with pytest.raises(InvalidInput, match="max_k"):
            trained.ask("What is my dog called?", k=k)
    trained.reconfigure(max_k=3)
    with pytest.raises(InvalidInput, match="between 1 and 3"):
        trained.ask("What is my dog called?", k=4)


def test_a_bad_decoding_name_is_refused(trained):
    with pytest.raises(InvalidInput, match="decoding"):
        trained.reconfigure(decoding="greedy")


def test_incremental_training_folds_in_new_memories(trained, home):
    trained.add("My favourite food is sushi.", id="food_favorite_sushi")
    trained.update("family_sister_anna", "My sister Anna moved to Vienna.")
    manifest = trained.train()
    inc = manifest["metrics"]["incremental"]
    assert inc["from_version"] == "v0001" and inc["new_memories"] == 2
    assert 0 < inc["replayed_examples"] <= 2 * inc["new_examples"]
    assert set(manifest["ids"]) == set(MEMORIES) | {"food_favorite_sushi"}
    # The questions file keeps every valid question for later replays: the old memories' too.
    cur = index_dir.current_dir(home / "indexes" / "default")
    recorded = {json.loads(line)["memory_id"] for line in (cur / "questions.jsonl").open()}
    assert recorded == set(manifest["ids"])
    trained.reconfigure(decoding="pure")  # the adapter alone, without the retrievers' help
    for mid, text in {**MEMORIES, "food_favorite_sushi": "My favourite food is sushi.",
                      "family_sister_anna": "My sister Anna moved to Vienna."}.items():
        a = trained.ask(text, k=1)
        assert a.candidates[0].id == mid and not a.hits[0].pending if a.hits else True
        assert a.candidates[0].id == mid


def test_questions_imported_for_indexed_memories_are_learned_by_the_next_train(trained, home):
    from ipm.engine import read_questions

    assert trained.train()["up_to_date"]
    asked = "What is the name of my four-legged buddy?"
    trained.import_records([{"question": asked, "memory_id": "personal_pet_max"}])
    assert trained.untrained() == ["personal_pet_max"]
    assert (trained.status()["pending"], trained.status()["changed"]) == (0, 1)
    manifest = trained.train()
    assert not manifest.get("up_to_date") and manifest["metrics"]["incremental"]["new_memories"] == 1
    assert manifest["questions"] == {"personal_pet_max": questions_digest([asked])}
    cur = index_dir.current_dir(home / "indexes" / "default")
    assert (asked, "personal_pet_max") in read_questions(cur)
    assert trained.untrained() == [] and trained.status()["changed"] == 0
    assert trained.train()["up_to_date"]
    trained.forget("personal_pet_max")  # a forgotten memory leaves the record of its questions too
    assert "personal_pet_max" not in index_dir.load_manifest(cur)["questions"]


def test_an_index_that_did_not_record_its_questions_is_not_retrained_for_them(trained, home):
    """Indexes trained before the manifest recorded user-given questions say nothing of them:
    nothing is taken as changed (a retrain of every memory with questions would be a guess)."""
    root = home / "indexes" / "default"
    cur = index_dir.current_dir(root)
    manifest = index_dir.load_manifest(cur)
    del manifest["questions"]
    index_dir.write_manifest(cur / index_dir.MANIFEST, manifest)
    trained.import_records([{"question": "Who is my beagle?", "memory_id": "personal_pet_max"}])
    assert trained.untrained() == [] and trained.status()["changed"] == 0
    # A train that continues from it records as learned only the questions it can see were: the
    # imported one is not in that version's training questions, so the next train learns it.
    trained.add("I drive a blue Mazda 3.", id="personal_car_mazda")
    manifest = trained.train()
    assert manifest["metrics"]["incremental"]["new_memories"] == 1 and "personal_pet_max" not in manifest["questions"]
    assert trained.untrained() == ["personal_pet_max"]
    assert trained.train()["questions"] == {"personal_pet_max": questions_digest(["Who is my beagle?"])}


def test_the_retrievers_match_the_training_questions_kept_with_the_index(mem, home, memories_file, tiny_config,
                                                                        tmp_path, monkeypatch):

    import torch
    from safetensors.torch import load_file

    from safetensors import safe_open

    from ipm.engine import QUESTION_EMBEDDINGS, TEXT_EMBEDDINGS, read_questions
    from ipm.retrieve import load_dense_encoder

    encoder = load_dense_encoder()
    mem.import_(memories_file)
    mem.add("The spare key is under the blue flowerpot.", id="home_key_flowerpot",
            questions=["How do I get into the zanzibar shed?"])
    mem.train()
    root = home / "indexes" / "default"
    v1 = index_dir.current_dir(root)
    rows = read_questions(v1)
    emb = load_file(str(v1 / QUESTION_EMBEDDINGS))["embeddings"]
    assert emb.dtype == torch.float16 and len(emb) == len(rows)
    assert torch.allclose(emb.float(), encoder.encode([q for q, _ in rows]).cpu(), atol=2e-3)

    # "zanzibar" is in no memory's text, only in a training question: BM25 proposes that memory
    mem.reconfigure(hybrid_candidates=1)
    hit = {h.id: h for h in mem.ask("zanzibar shed", k=5).candidates}["home_key_flowerpot"]
    assert hit.signals.bm25 > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the threshold was calibrated with the expansion on
        mem.reconfigure(expand_retrievers=False)
        plain = {h.id: h for h in mem.ask("zanzibar shed", k=5).candidates}
    assert "home_key_flowerpot" not in plain or plain["home_key_flowerpot"].signals.bm25 == 0

    # The texts' embeddings are kept too (one row per indexed ID): a serving process reads them
    texts = load_file(str(v1 / TEXT_EMBEDDINGS))
    with safe_open(str(v1 / TEXT_EMBEDDINGS), framework="pt") as f:
        text_ids, text_shas = json.loads(f.metadata()["ids"]), json.loads(f.metadata()["sha256"])
    by_id = {m.id: m.text for m in mem.list()}
    assert sorted(text_ids) == sorted(by_id) and texts["embeddings"].dtype == torch.float32
    assert text_shas == [json.loads((v1 / "manifest.json").read_text())["ids"][i] for i in text_ids]
    assert torch.allclose(texts["embeddings"], encoder.encode([by_id[i] for i in text_ids]).cpu(), atol=1e-5)
    encoded: list[str] = []
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts: encoded.extend(texts) or real(texts))
    fresh = ipm.open(home, config=tiny_config.updated(hybrid_candidates=1), cache=tmp_path / "cache")
    same = {h.id: h for h in fresh.ask("zanzibar shed", k=5).candidates}["home_key_flowerpot"]
    assert encoded == ["zanzibar shed"] and same.signals == hit.signals
    fresh.update("home_key_flowerpot", "The spare key is in the garage.")  # changed since training: encoded
    fresh.ask("zanzibar shed")
    assert encoded[1:] == ["The spare key is in the garage.", "zanzibar shed"]
    fresh.update("home_key_flowerpot", "The spare key is under the blue flowerpot.")
    fresh.store.close()
    # A damaged file is derived data: the texts are encoded again, and a purge deletes it
    (v1 / TEXT_EMBEDDINGS).write_bytes(b"damaged")
    encoded.clear()
    fresh = ipm.open(home, config=tiny_config.updated(hybrid_candidates=1), cache=tmp_path / "cache")
    assert {h.id: h for h in fresh.ask("zanzibar shed", k=5).candidates}["home_key_flowerpot"].signals == hit.signals
    assert len(encoded) == len(by_id) + 1
    fresh.add("A note to forget.", id="note_to_forget")
    fresh.forget("note_to_forget")
    assert not (v1 / TEXT_EMBEDDINGS).exists()
    fresh.store.close()
    monkeypatch.setattr(encoder, "encode", real)

    # An index that kept no embeddings is served the same, embedding its questions once
    (v1 / QUESTION_EMBEDDINGS).unlink()
    other = ipm.open(home, config=tiny_config.updated(hybrid_candidates=1), cache=tmp_path / "cache")
    again = {h.id: h for h in other.ask("zanzibar shed", k=5).candidates}["home_key_flowerpot"]
    assert again.signals.bm25 == pytest.approx(hit.signals.bm25) and again.signals.dense == pytest.approx(
        hit.signals.dense, abs=1e-3)
    other.store.close()

    # An incremental train embeds only the new memory's questions and keeps the rest as they were
    mem.reconfigure(expand_retrievers=True)
    mem.train(full=True)
    v2 = index_dir.current_dir(root)
    old = dict(zip(read_questions(v2), load_file(str(v2 / QUESTION_EMBEDDINGS))["embeddings"]))
    encoded: list[str] = []
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts: encoded.extend(texts) or real(texts))
    mem.add("My favourite food is sushi.", id="food_favorite_sushi")
    mem.train()
    v3 = index_dir.current_dir(root)
    rows3 = read_questions(v3)
    emb3 = load_file(str(v3 / QUESTION_EMBEDDINGS))["embeddings"]
    assert {mid for _, mid in rows3} == set(MEMORIES) | {"home_key_flowerpot", "food_favorite_sushi"}
    texts = {m.text for m in mem.list()}  # (the retrievers encode the memory texts themselves)
    for row, e in zip(rows3, emb3):
        if row in old:
            assert torch.equal(e, old[row]) and (row[0] in texts or row[0] not in encoded)
        else:
            assert row[1] == "food_favorite_sushi" and row[0] in encoded
    # ... and of the texts only the new memory's (as a question and as a text): the others' text
    # embeddings come from the version before
    assert {t for t in encoded if t in texts} == {"My favourite food is sushi."}

    # A memory updated since training no longer matches the questions made from its old text
    assert {h.id: h for h in mem.ask("zanzibar shed", k=5).candidates}["home_key_flowerpot"].signals.bm25 > 0
    mem.update("home_key_flowerpot", "The spare key is in the garage.")
    after = {h.id: h for h in mem.ask("zanzibar shed", k=5).candidates}
    assert "home_key_flowerpot" not in after or after["home_key_flowerpot"].signals.bm25 == 0


@pytest.mark.parametrize("folds", [10, 2])
def test_hybrid_calibration_asks_each_held_back_question_without_its_memorys_training_questions(
        mem, memories_file, tiny_config, monkeypatch, folds):
    from ipm import engine
    from ipm.engine import IPM
    from ipm.questions import OFF_TOPIC

    mem.config = tiny_config.updated(calibration_fraction=0.3)  # 1-2 held-back questions a memory
    monkeypatch.setattr(engine, "CALIBRATION_FOLDS", folds)
    expanded_for, asked = {}, []
    build, top1 = IPM._candidates, IPM._top1

    def spy_build(self, memories, embeddings=None, expansion=None):
        c = build(self, memories, embeddings, expansion)
        expanded_for[id(c)] = set(expansion or ())
        return c

    def spy_top1(self, decoder, questions, trie, candidates, tick):
        asked.extend((q, candidates) for q in questions)
        return top1(self, decoder, questions, trie, candidates, tick)
    monkeypatch.setattr(IPM, "_candidates", spy_build)
    monkeypatch.setattr(IPM, "_top1", spy_top1)
    mem.import_(memories_file)
    manifest = mem.train()
    _, calib = mem.training_examples("default")
    gold = {ex.question: ex.memory_id for ex in calib}
    hybrid = [(q, expanded_for[id(c)]) for q, c in asked if c is not None]
    held_back = [(q, expanded) for q, expanded in hybrid if q in gold]
    assert sorted(q for q, _ in held_back) == sorted(gold) and len(gold) == len(calib)
    assert set(gold.values()) == set(MEMORIES)
    # Its memory's questions are out, and those of the other memories of its group; the rest stay in
    groups = {frozenset(set(MEMORIES) - expanded) for _, expanded in held_back}
    assert all(gold[q] not in expanded for q, expanded in held_back)
    assert len(groups) == min(folds, len(MEMORIES)) and set().union(*groups) == set(MEMORIES)
    assert sum(len(g) for g in groups) == len(MEMORIES)
    # off-topic questions meet the retrievers a served index has, every memory expanded
    assert [q for q, e in hybrid if e == set(MEMORIES) and q not in gold] == OFF_TOPIC
    hybrid_cal = manifest["metrics"]["calibration"]["hybrid"]
    assert hybrid_cal["expansion_folds"] == len(groups) and hybrid_cal["n_in_scope"] == len(gold)
    assert manifest["metrics"]["calibration"]["pure"]["n_in_scope"] == len(gold)


def test_incremental_calibration_asks_questions_no_adapter_was_trained_on(trained, home, monkeypatch):
    from ipm.engine import IPM, read_questions

    trained.config = trained.config.updated(calibration_fraction=0.3)
    trained.train(full=True)
    trained_on = set(read_questions(index_dir.current_dir(home / "indexes" / "default")))
    calibrated: list = []
    real = IPM._calibration_top1

    def spy(self, decoder, trie, cal, *args):
        calibrated.append(list(cal))
        return real(self, decoder, trie, cal, *args)
    monkeypatch.setattr(IPM, "_calibration_top1", spy)
    trained.add("My favourite food is sushi.", id="food_favorite_sushi")
    manifest = trained.train()
    assert manifest["metrics"]["incremental"] is not None
    cal = calibrated[0]
    old = [ex for ex in cal if ex.memory_id != "food_favorite_sushi"]
    assert old and any(ex.memory_id == "food_favorite_sushi" for ex in cal)
    texts = {m.id: m.text for m in trained.list()}
    for ex in old:  # held back from the first version too, and not a memory's own text
        assert (ex.question, ex.memory_id) not in trained_on and ex.question != texts[ex.memory_id]


def test_train_with_nothing_new_is_up_to_date_and_full_retrains(trained):
    again = trained.train()
    assert again["up_to_date"] and again["version"] == "v0001"
    full = trained.train(full=True)
    assert full["version"] == "v0002" and full["metrics"]["incremental"] is None


def test_ids_are_minted_with_the_configured_scheme(mem, home, tiny_config, tmp_path):
    fact = "Caroline attended an LGBTQ support group recently and found the transgender stories inspiring."
    assert mem.add(fact).id == "caroline_lgbtq_transgender"  # salient, the default
    lexicon = ipm.open(home, config=tiny_config.updated(id_scheme="lexicon"), cache=tmp_path / "cache")
    assert lexicon.add(fact, user="other").id == "note_caroline_lgbtq"
    with pytest.raises(InvalidInput, match="id_scheme"):
        tiny_config.updated(id_scheme="random")


def test_only_the_configured_decoding_is_calibrated_unless_asked(home, memories_file, tiny_config, tmp_path):
    """Calibrating a decoding costs indexing time, so by default only the one that will serve is
    calibrated; switching to another gives an error that says how to calibrate it too. Once
    asked for, a calibration is kept by later trainings."""
    opened = lambda **cfg: ipm.open(home, config=tiny_config.updated(**cfg), cache=tmp_path / "cache")  # noqa: E731
    mem = opened(also_calibrate=[])
    mem.import_(memories_file)
    calibration = mem.train()["metrics"]["calibration"]
    assert set(calibration) == {"hybrid"} and calibration["hybrid"]["seconds"] > 0
    assert mem.ask(MEMORIES["work_job_acme"], k=1).candidates[0].id == "work_job_acme"
    mem.reconfigure(decoding="pure")
    with pytest.raises(IndexMissing, match=r"calibrated for hybrid decoding, not pure: ask with that decoding \(`ipm ask --decoding hybrid`\), or .*--also-calibrate pure"):
        mem.ask(MEMORIES["work_job_acme"])
    mem.reconfigure(abstain_threshold=0.5)  # a threshold of one's own serves without calibration
    assert mem.ask(MEMORIES["work_job_acme"], k=1).candidates[0].id == "work_job_acme"
    # Asked for on an index with nothing new to learn: trained again, calibrated for both.
    manifest = opened(also_calibrate=["pure"]).train()
    assert not manifest.get("up_to_date") and manifest["metrics"]["full_because"] == "pure decoding was not calibrated"
    assert set(manifest["metrics"]["calibration"]) == {"pure", "hybrid"}
    assert all(c["seconds"] > 0 for c in manifest["metrics"]["calibration"].values())
    # The next training, under a config that names neither, keeps both.
    later = opened(decoding="pure", also_calibrate=[])
    later.add("My cat is called Tom.")
    manifest = later.train()
    assert manifest["metrics"]["incremental"] and set(manifest["metrics"]["calibration"]) == {"pure", "hybrid"}
    assert later.train().get("up_to_date")
    with pytest.raises(InvalidInput, match="also_calibrate"):
        tiny_config.updated(also_calibrate=["greedy"])


def test_hard_negatives_from_the_retrievers_train_and_recall(home, memories_file, tiny_config, tmp_path):
    mem = ipm.open(home, config=tiny_config.updated(hard_negatives=2, epochs=20), cache=tmp_path / "cache")
    mem.import_(memories_file)
    manifest = mem.train()
    assert manifest["config"]["hard_negatives"] == 2 and manifest["metrics"]["hard_negative_choices"] > 0
    mem.reconfigure(decoding="pure")
    for mid, text in MEMORIES.items():
        assert mem.ask(text, k=1).candidates[0].id == mid
    negs = mem._with_negatives([Example(MEMORIES["work_job_acme"], "work_job_acme")],
                               mem._candidates(mem.list()))
    assert negs[0].negatives and "work_job_acme" not in negs[0].negatives
    assert set(negs[0].negatives) < set(MEMORIES)
    with pytest.raises(InvalidInput, match="hard_negatives"):
        tiny_config.updated(hard_negatives=-1)


def test_related_question_kind_trains_on_memories_asked_in_other_words(mem, memories_file, tiny_config, monkeypatch):
    from test_questions import FakeEncoder

    import ipm.engine

    mem.config = tiny_config.updated(question_kinds=["related"])
    mem.import_(memories_file)
    monkeypatch.setattr(ipm.engine, "load_dense_encoder", FakeEncoder)
    train, calib = mem.training_examples("default")
    dog = {e.question for e in train + calib if e.memory_id == "personal_pet_max"}
    assert any("puppy" in q or "canine" in q for q in dog)

    def missing():
        raise ModelError("dense retrieval needs `pip install sentence-transformers`")
    monkeypatch.setattr(ipm.engine, "load_dense_encoder", missing)
    with pytest.raises(ModelError, match="question kind 'related' needs the dense model"):
        mem.training_examples("default")


def test_alias_question_kind_reads_who_is_who_from_every_memory(mem, tiny_config):
    """An incremental train generates questions for the new memories only, but the aliases
    come from all of them: a new memory naming Priya is asked about as "my wife"."""
    mem.config = tiny_config.updated(question_kinds=["spans", "aliases"])
    mem.add("My wife Priya is an ER nurse at Legacy Emanuel.", id="family_wife_job")
    mem.add("Priya's car is a white 2022 Toyota Prius.", id="personal_car_prius")
    train, calib = mem.training_examples("default", ids={"personal_car_prius"})
    car = [e.question for e in train + calib]
    assert {e.memory_id for e in train + calib} == {"personal_car_prius"}
    assert "My wife's car is a white 2022 Toyota Prius." in car
    # without the kind: the same split, less the alias questions
    mem.config = tiny_config.updated(question_kinds=["spans"])
    plain_train, plain_calib = mem.training_examples("default", ids={"personal_car_prius"})
    assert plain_calib == calib and [e for e in train if "wife" not in e.question] == plain_train


def test_an_index_on_some_layers_of_the_base_is_served_on_those_layers(home, mem, memories_file, tiny_config,
                                                                        tmp_path):
    """base_layers keeps the top lora_layers layers and the lowest others; the manifest
    records which, and a process configured otherwise serves the index on them (its adapter
    belongs there) and does not continue it incrementally on another set of layers."""
    from ipm.errors import ModelError
    from ipm.model import layer_ranges

    mem.config = tiny_config.updated(base_layers=3)  # of 4, with LoRA in the top 2
    mem.import_(memories_file)
    manifest = mem.train()
    assert manifest["base_model"]["layers"] == [0, 2, 3] and manifest["metrics"]["trained_layers"] == 2
    mem.reconfigure(decoding="pure")
    assert [mem.ask(text, k=1).candidates[0].id for text in MEMORIES.values()] == list(MEMORIES)
    mem.store.close()
    reopened = ipm.open(home, config=tiny_config.updated(decoding="pure"), cache=tmp_path / "cache")
    try:
        assert [reopened.ask(text, k=1).candidates[0].id for text in MEMORIES.values()] == list(MEMORIES)
        assert len(reopened._base.model.get_decoder().layers) == 3 and reopened._base.layers == (0, 2, 3)
        assert reopened._base.label.endswith("(layers 0,2-3)") and layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
        reopened.add("My favourite food is sushi.", id="food_favorite_sushi")
        again = reopened.train()  # configured with every layer: a full retrain, not a continuation
        assert again["base_model"]["layers"] is None and again["metrics"]["incremental"] is None
        assert again["metrics"]["full_because"] == ("the current index was trained on base layers 0,2-3, this "
                                                    "configuration keeps all (base_layers)")
        # The one namespace this process serves moves to the new index's base, every layer.
        assert reopened.ask("what is my dog called?", k=1).candidates and reopened._base.layers is None
    finally:
        reopened.store.close()
    wrong = ipm.open(home, config=tiny_config.updated(base_layers=5), cache=tmp_path / "cache")
    with pytest.raises(ModelError, match="has only 4 decoder layers"):
        wrong.base()
    wrong.store.close()
    # transformers' own generate (the generic decoder's path) runs on the kept layers: each
    # attention layer's KV-cache slot is renumbered.
    import torch

    fewer = ipm.open(home, config=tiny_config.updated(base_layers=3), cache=tmp_path / "cache")
    try:
        model = fewer.base().model
        assert [layer.self_attn.layer_idx for layer in model.get_decoder().layers] == [0, 1, 2]
        out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 6)
    finally:
        fewer.store.close()
    other = tmp_path / "gpt2ish"
    other.mkdir()
    from ipm.model import kept_layers
    for cfg in ({"model_type": "gpt2", "num_hidden_layers": 4}, {"model_type": "gpt2", "n_layer": 4}):  # as GPT-2 has it
        (other / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelError, match="Llama-family.*'gpt2'"):
            kept_layers(tiny_config.updated(base_layers=3), other)
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="layer count"):
        kept_layers(tiny_config.updated(base_layers=3), other)
    for bad in ({"base_layers": -1}, {"base_layers": 2}, {"base_layers": 3, "lora_layers": 0}):
        with pytest.raises(InvalidInput, match="base_layers"):
            tiny_config.updated(**bad)


def test_cli_train_says_when_it_retrains_from_scratch(tiny_model, memories_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ipm.cli import app

    monkeypatch.setenv("IPM_CACHE", str(tmp_path / "cache"))
    home = str(tmp_path / "clihome")
    common = ["--home", home, "--base-model", str(tiny_model), "--lora-layers", "2", "--epochs", "2",
              "--questions-per-memory", "4"]
    runner = CliRunner()
    assert runner.invoke(app, ["import", str(memories_file), "--home", home]).exit_code == 0
    first = runner.invoke(app, ["train", *common, "--base-layers", "3"])
    assert first.exit_code == 0 and "retrained from scratch" not in first.output
    assert runner.invoke(app, ["add", "My favourite food is sushi.", "--home", home]).exit_code == 0
    second = runner.invoke(app, ["train", *common])
    assert second.exit_code == 0, second.output
    said = " ".join(second.output.split())  # rich wraps long lines
    assert "retrained from scratch, not incrementally: the current index was trained on base layers 0,2-3" in said


def test_int8_asks_answer_from_the_store_and_bad_settings_are_refused(trained, tmp_path):
    from ipm.model import int8_available

    with pytest.raises(InvalidInput, match="quantize"):
        trained.reconfigure(quantize="int4")
    if not int8_available():
        with pytest.raises(ModelError, match="int8"):
            trained.reconfigure(quantize="int8")
        return
    for decoding in ("hybrid", "pure"):
        trained.reconfigure(decoding=decoding, quantize="none")
        plain = trained.ask(MEMORIES["family_sister_anna"], k=4)
        trained.reconfigure(quantize="int8")
        quantized = trained.ask(MEMORIES["family_sister_anna"], k=4)
        assert {h.id for h in quantized.candidates} <= set(MEMORIES)
        assert quantized.candidates[0].id == plain.candidates[0].id == "family_sister_anna"
        for h in quantized.hits:
            assert h.text == MEMORIES[h.id]
        assert sum(h.score for h in quantized.candidates) == pytest.approx(1.0, abs=1e-4)


def test_int8_is_refused_where_it_cannot_run(tiny_model):
    """A non-Llama model (the generic decoder) or a GPU gets one clear error, not a crash."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from ipm.engine import IPM
    from ipm.model import BaseModel

    cfg = ipm.Config(quantize="int8")
    gpt2 = BaseModel("gpt2ish", tiny_model, "0", None, GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), "cpu")
    with pytest.raises(ModelError, match="Llama-family"):
        IPM._int8(gpt2, cfg)
    llama = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(ModelError, match="on a CPU"):
        IPM._int8(BaseModel("tiny", tiny_model, "0", None, llama, "cuda"), cfg)
    assert IPM._int8(BaseModel("tiny", tiny_model, "0", None, llama, "cuda"), ipm.Config()) is False


def test_auto_quantize_is_int8_only_where_the_cpu_multiplies_int8_itself(tiny_model, monkeypatch):
    """quantize = "auto", the default: int8 for a Llama-family model on an x86 CPU with VNNI or
    AMX and oneDNN's int8 matmul; the model's dtype on a GPU, without VNNI (7-bit weights,
    recall unmeasured), without the kernels or for another model family. Never an error."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    import ipm.model
    from ipm.engine import IPM
    from ipm.model import BaseModel

    cfg = ipm.Config()
    assert cfg.quantize == "auto"
    llama = AutoModelForCausalLM.from_pretrained(tiny_model)
    cpu = BaseModel("tiny", tiny_model, "0", None, llama, "cpu")
    monkeypatch.setattr(ipm.model, "int8_available", lambda: True)
    monkeypatch.setattr(ipm.model, "_cpu_has_vnni", lambda: True)
    assert IPM._int8(cpu, cfg) is True
    assert IPM._int8(cpu, cfg.updated(quantize="none")) is False
    assert IPM._int8(BaseModel("tiny", tiny_model, "0", None, llama, "cuda"), cfg) is False
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2))
    assert IPM._int8(BaseModel("gpt2ish", tiny_model, "0", None, gpt2, "cpu"), cfg) is False
    monkeypatch.setattr(ipm.model, "_cpu_has_vnni", lambda: False)
    assert IPM._int8(cpu, cfg) is False
    monkeypatch.setattr(ipm.model, "_cpu_has_vnni", lambda: True)
    monkeypatch.setattr(ipm.model, "int8_available", lambda: False)
    assert IPM._int8(cpu, cfg) is False


def test_auto_quantize_calibration_records_what_the_scores_came_from(trained, monkeypatch):
    """An index trained under "auto" records int8 or none, as it resolved on the training
    machine: served where "auto" resolves the other way, the hybrid threshold warns."""
    import ipm.engine
    from ipm.model import int8_available, int8_suits

    trained.ask("what is my dog called?")  # the base model is loaded
    manifest = index_dir.read_manifest(trained.paths.index_root("default"))
    resolved = "int8" if int8_suits(trained._base) else "none"
    assert manifest["config"]["quantize"] == "auto"
    assert manifest["metrics"]["calibration"]["hybrid"]["fusion"]["quantize"] == resolved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trained.ask(MEMORIES["family_sister_anna"]).candidates[0].id == "family_sister_anna"
    assert not [w for w in caught if "calibrated" in str(w.message)]
    assert manifest["metrics"]["calibration"]["pure"]["quantize"] == resolved
    if resolved == "none" and not int8_available():
        return  # no machine here to play the other one on
    monkeypatch.setattr(ipm.engine, "int8_suits", lambda base: resolved == "none")  # another machine
    trained.reconfigure(quantize="auto")
    hint = f"or set quantize = '{resolved}'"
    with pytest.warns(UserWarning, match=f"quantize {resolved}.*{hint}"):
        assert trained.ask(MEMORIES["family_sister_anna"]).candidates[0].id == "family_sister_anna"
    trained.reconfigure(decoding="pure")  # its threshold hangs on int8 asks too
    with pytest.warns(UserWarning, match=f"calibrated with quantize {resolved}, not .*{hint}"):
        assert trained.ask(MEMORIES["family_sister_anna"]).candidates[0].id == "family_sister_anna"
    trained.reconfigure(quantize=resolved)  # served as calibrated: nothing to say
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained.ask(MEMORIES["family_sister_anna"])
    assert not [w for w in caught if "calibrated" in str(w.message)]


def test_int8_where_it_cannot_run_is_refused_before_anything_changes(trained, monkeypatch):
    """Without the int8 kernels: `reconfigure` refuses and keeps the config; `train` refuses
    before training (nothing written)."""
    import ipm.engine

    monkeypatch.setattr(ipm.engine, "int8_available", lambda: False)
    trained.ask("what is my dog called?")  # the base model is loaded
    with pytest.raises(ModelError, match="int8"):
        trained.reconfigure(quantize="int8")
    assert trained.config.quantize == "auto"  # as configured
    assert trained.ask("what is my dog called?").candidates  # still serving
    trained.add("My cat is called Luna.", user="other")
    configured = trained.config
    trained.config = configured.updated(quantize="int8")  # as if opened with it
    try:
        with pytest.raises(ModelError, match="int8"):
            trained.train(user="other")
    finally:
        trained.config = configured
    assert index_dir.current_dir(trained.paths.index_root("other")) is None
    assert not [e for e in trained.log(user="other") if e.action == "train"]


def test_an_index_trained_on_a_relative_base_model_path_is_served_from_any_directory(tiny_model, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    cfg = tiny_config_for(tiny_model).updated(base_model=tiny_model.name, epochs=2, also_calibrate=[])
    m = ipm.open(tmp_path / "home", config=cfg, cache=tmp_path / "cache")
    m.import_records(MEMORIES)
    m.train()
    m.store.close()
    manifest = json.loads((index_dir.current_dir(tmp_path / "home" / "indexes" / "default") / "manifest.json").read_text())
    assert manifest["base_model"]["source"] == str(tiny_model)
    monkeypatch.chdir(tmp_path)  # another working directory, where the relative path names nothing
    served = ipm.open(tmp_path / "home", config=tiny_config_for(tiny_model), cache=tmp_path / "cache")
    assert served.ask("What is my dog called?", k=1).candidates[0].id in MEMORIES  # served on the manifest's model
    served.store.close()


def test_a_base_model_that_names_its_layers_otherwise_gets_all_linear_layers(tiny_model, tmp_path):
    """The default target_modules are Llama's names; GPT-2 calls its linear maps c_attn, c_fc,
    c_proj: it is adapted in all of them, and target_modules set by hand that name none of a
    model's layers are one clear error listing the ones it has."""
    import shutil
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    from ipm.train import train_adapter

    path = tmp_path / "tiny-gpt2"
    shutil.copytree(tiny_model, path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    (path / "config.json").unlink()
    GPT2LMHeadModel(GPT2Config(vocab_size=700, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    m = ipm.open(tmp_path / "home", config=tiny_config_for(path).updated(epochs=1), cache=tmp_path / "cache")
    base = m.base()
    examples = [Example(t, mid) for mid, t in MEMORIES.items()]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trained = train_adapter(base, examples, m.config)
    assert not [w for w in said if "fan_in_fan_out" in str(w.message)]  # PEFT's, told instead of warning
    assert trained.metrics["path"] == "naive"
    adapted = {name.rsplit(".", 1)[-1] for name in trained.model.peft_config["default"].target_modules}
    assert adapted >= {"c_attn", "c_fc"}
    with pytest.raises(TrainingError, match=r"target_modules \['q_proj'\] name no linear layer .*gpt2.*c_attn"):
        train_adapter(base, examples, m.config.updated(target_modules=["q_proj"]))
    m.store.close()


def test_a_long_memory_is_cut_to_a_bounded_prompt_and_long_batches_are_split(tiny_model):
    import random

    from transformers import AutoTokenizer

    from ipm.model import MAX_QUESTION_TOKENS, prompt_ids
    from ipm.train import BATCH_TOKENS_PER_EXAMPLE, _length_bucketed_batches

    tok = AutoTokenizer.from_pretrained(tiny_model)
    short = "My dog's name is Max and he is a beagle."
    assert prompt_ids(tok, short) == tok(short + "\nMemory:").input_ids  # as before
    long = " ".join(["My sister Anna lives in Berlin."] * 400)
    assert MAX_QUESTION_TOKENS < len(tok(long).input_ids) and len(prompt_ids(tok, long)) <= MAX_QUESTION_TOKENS + 8
    tok.model_max_length = 256  # a model with a shorter context than that: half of it
    assert 100 < len(prompt_ids(tok, long)) <= 128 + 8
    seqs = [([1] * 20, 10)] * 40 + [([1] * 600, 500)] * 40
    batches = _length_bucketed_batches(seqs, 32, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(80))
    assert all(len(b) * max(len(seqs[i][0]) for i in b) <= max(32 * BATCH_TOKENS_PER_EXAMPLE, 600) for b in batches)
    assert max(len(b) for b in batches if len(seqs[b[0]][0]) == 20) > 16  # short ones batched as before


def test_a_device_this_machine_lacks_and_absurd_thread_counts_are_one_clear_error():
    import torch

    from ipm import Config
    from ipm.model import pick_device

    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="device 'cuda' is not available on this machine"):
            pick_device(Config(device="cuda"))
    with pytest.raises(InvalidInput, match="threads must be at most 1024"):
        Config(threads=100000).check()


def test_a_damaged_adapter_is_an_error_naming_the_version_and_a_train_makes_the_index_again(trained, home,
                                                                                           tiny_config, tmp_path):
    """A deleted or truncated adapter file is IndexDamaged naming the version (was PEFT's
    traceback about a repo id or a safetensors header); `ipm train` retrains it in full."""
    import os
    import shutil

    from ipm.errors import IndexDamaged

    version = home / "indexes" / "default" / "v0001"
    saved = tmp_path / "saved"
    shutil.copytree(version, saved)
    weights, config = version / "adapter_model.safetensors", version / "adapter_config.json"
    for damage in (lambda: weights.unlink(), lambda: os.truncate(weights, 1000), lambda: config.unlink(),
                   lambda: config.write_text("{")):
        shutil.rmtree(version)
        shutil.copytree(saved, version)
        damage()
        fresh = ipm.open(home, config=tiny_config, cache=tmp_path / "cache")
        with pytest.raises(IndexDamaged, match=f"index version {version} cannot be read .*delete that directory"):
            fresh.ask("what is my dog called?")
        with pytest.raises(IndexDamaged, match=f"index version {version} cannot be read"):
            fresh.status()  # not "index v0001" as if it were whole
        fresh.store.close()
    manifest = trained.train()  # continuing from it is impossible: in full
    assert manifest["version"] == "v0002" and manifest["metrics"]["full_because"].startswith(
        "the current index cannot be read (index version")
    assert trained.ask(MEMORIES["personal_pet_max"], k=1).candidates
    # A CURRENT that names no version, or a version without its manifest: the same
    pointer = home / "indexes" / "default" / "CURRENT"
    for name, version in (("garbage", "v0003"), ("v0009", "v0010")):
        (pointer.parent / name).mkdir()  # (garbage: a directory that is not a version)
        pointer.write_text(name)
        with pytest.raises(IndexDamaged):
            trained.ask("what is my dog called?")
        manifest = trained.train()
        assert manifest["version"] == version and "cannot be read" in manifest["metrics"]["full_because"]


def test_an_index_does_not_hang_on_the_order_of_the_import_file(tiny_config, tmp_path):
    """`ipm list` gives one import's memories in the file's order; training reads them in a
    fixed order (by ID), so the same memories in another order train the same index."""
    import torch
    from safetensors.torch import load_file

    trained = []
    for name, order in (("forward", list(MEMORIES.items())), ("backward", list(MEMORIES.items())[::-1])):
        m = ipm.open(tmp_path / name, config=tiny_config.updated(epochs=2), cache=tmp_path / "cache")
        m.import_records(dict(order))
        assert [x.id for x in m.list()] == [mid for mid, _ in order]
        version = tmp_path / name / "indexes" / "default" / m.train()["version"]
        trained.append(((version / "questions.jsonl").read_text(), load_file(version / "adapter_model.safetensors")))
        m.store.close()
    (q1, w1), (q2, w2) = trained
    assert q1 == q2 and w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_forgetting_again_finishes_a_forget_killed_after_the_store_let_the_memory_go(trained, home):
    from ipm.errors import NotFound

    root = home / "indexes" / "default"
    questions = index_dir.current_dir(root) / "questions.jsonl"
    # what a forget killed between the store's delete and its purge leaves
    index_dir.remember_forgotten(root, "personal_pet_max", trained.store.generation("default"))
    trained.store.forget("default", "personal_pet_max")
    assert MEMORIES["personal_pet_max"] in questions.read_text()
    trained.forget("personal_pet_max")  # was: "no memory 'personal_pet_max'", the text left on disk
    assert MEMORIES["personal_pet_max"] not in questions.read_text()
    assert index_dir.pending_forgets(root) == set()
    with pytest.raises(NotFound):  # now there is nothing left to forget
        trained.forget("personal_pet_max")


def test_settings_a_base_model_cannot_train_under_are_refused_before_any_work(mem, tiny_config, monkeypatch):
    import ipm.engine
    from ipm.errors import InvalidInput

    mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max")
    monkeypatch.setattr(ipm.engine.IPM, "training_examples", lambda *a, **k: pytest.fail("questions were written"))
    mem.config = tiny_config.updated(hard_negatives=2)
    monkeypatch.setattr(ipm.engine.Runner, "supports", staticmethod(lambda model: False))  # as for GPT-2
    with pytest.raises(TrainingError, match="hard negatives need the fast training path"):
        mem.train()
    with pytest.raises(InvalidInput, match="question_source 'both' has the base model write"):
        ipm.Config(question_source="both", base_layers=15)

