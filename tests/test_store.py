import sqlite3

import pytest

from ipm.errors import DuplicateID, InvalidID, InvalidInput, NotFound
from ipm.store import NewMemory, Store

TRICKY = ["  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n", "emoji 🐶🏳️‍🌈 and CJK 日本語",
          "nul \x00 byte inside", "combining é vs é", "right-to-left עברית", "x" * 60000]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "ipm.db")
    yield s
    s.close()


@pytest.mark.parametrize("text", TRICKY)
def test_text_round_trips_byte_exact(store, text):
    m = store.add("u", text, "note_test_text")
    again = Store(store.path).get("u", m.id)
    assert again.text.encode("utf-8") == text.encode("utf-8")
    assert again.sha256 == m.sha256


@pytest.mark.parametrize("text,match", [("", "empty"), ("   \n", "empty"), ("y" * 70000, "limit"),
                                        ("lone \ud800 surrogate", "surrogate")])
def test_bad_text_is_rejected_and_nothing_written(store, text, match):
    with pytest.raises(InvalidInput, match=match):
        store.add("u", text)
    assert store.count("u") == 0
    assert store.events("u") == []


def test_batch_is_all_or_nothing(store):
    store.add("u", "existing", "note_a_b")
    batch = [NewMemory("one"), NewMemory("two", "note_c_d"), NewMemory("three", "note_a_b")]
    with pytest.raises(DuplicateID, match="record 2"):
        store.add_many("u", batch)
    assert store.ids("u") == ["note_a_b"]
    with pytest.raises(InvalidID, match="record 1"):
        store.add_many("u", [NewMemory("ok"), NewMemory("bad", "Bad")])
    assert store.ids("u") == ["note_a_b"]


def test_duplicate_ids_within_one_batch_are_rejected(store):
    with pytest.raises(DuplicateID, match=r"record 2: memory ID 'note_x_y' is given twice in this input \(also record 0\)"):
        store.add_many("u", [NewMemory("a", "note_x_y"), NewMemory("c"), NewMemory("b", "note_x_y")])
    assert store.count("u") == 0


def test_namespaces_are_separate(store):
    store.add("alice", "same text", "note_same_id")
    store.add("bob", "same text", "note_same_id")
    store.forget("alice", "note_same_id")
    assert store.ids("alice") == []
    assert store.ids("bob") == ["note_same_id"]
    for bad in ("bad namespace!", "bob\n"):
        with pytest.raises(InvalidInput):
            store.add(bad, "x")
    assert store.namespaces() == ["bob"]


def test_update_keeps_history(store):
    store.add("u", "v1 text", "note_a_b")
    m = store.update("u", "note_a_b", "v2 text")
    assert (m.text, m.version) == ("v2 text", 2)
    assert [h["text"] for h in store.history("u", "note_a_b")] == ["v1 text", "v2 text"]


def test_forget_purges_text_questions_and_history_but_logs_the_id(store):
    secret = "my secret pin is 4812-unique-marker"
    store.add("u", secret, "personal_pin_secret", questions=["what is my pin code?"])
    store.update("u", "personal_pin_secret", secret + " (updated)")
    store.forget("u", "personal_pin_secret")
    with pytest.raises(NotFound):
        store.get("u", "personal_pin_secret")
    events = store.events("u")
    assert events[-1].action == "forget" and events[-1].ids == ["personal_pin_secret"]
    store.close()
    conn = sqlite3.connect(store.path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw = store.path.read_bytes()
    assert b"4812-unique-marker" not in raw
    assert b"what is my pin code" not in raw


def test_forget_leaves_no_copy_in_the_write_ahead_log_of_a_store_still_open(store):
    store.add("u", "my locker code is 5521-wal-marker", "personal_locker_code")
    store.add("u", "an unrelated memory that stays", "note_other_memory")
    store.forget("u", "personal_locker_code")
    files = [store.path, store.path.with_name(store.path.name + "-wal")]
    assert not any(b"5521-wal-marker" in f.read_bytes() for f in files if f.exists())
    assert store.get("u", "note_other_memory").text == "an unrelated memory that stays"


def test_questions_need_existing_memories(store):
    store.add("u", "text", "note_a_b")
    with pytest.raises(NotFound, match="record 1"):
        store.add_questions("u", [("note_a_b", "q1?"), ("note_missing_x", "q2?")])
    assert store.questions("u") == {}
    assert store.add_questions("u", [("note_a_b", "q1?"), ("note_a_b", "q1?")]) == 1


def test_log_many_is_one_transaction(store):
    store.log_many("u", "ask", [(["a_b_c"], {"abstained": False}), ([], {"abstained": True})])
    assert [(e.ids, e.detail) for e in store.events("u")] == [(["a_b_c"], {"abstained": False}),
                                                              ([], {"abstained": True})]
    with pytest.raises(TypeError):  # the second entry cannot be written: neither is
        store.log_many("u", "ask", [(["x_y_z"], {}), ([], {"bad": object()})])
    assert len(store.events("u")) == 2


def test_list_pages_through_the_memories_oldest_first_with_their_own_questions(store):
    for i in range(5):
        store.add("u", f"note {i}", f"note_page_n{i}", questions=[f"q{i}?"])
    store.add("v", "elsewhere", "note_page_n9")
    every = store.list("u")
    assert [m.id for m in every] == [f"note_page_n{i}" for i in range(5)]
    page = store.list("u", limit=2, offset=1)
    assert [(m.id, m.questions) for m in page] == [(m.id, m.questions) for m in every[1:3]]
    assert page[0].questions == ["q1?"]
    assert [m.id for m in store.list("u", offset=3)] == ["note_page_n3", "note_page_n4"]
    assert store.list("u", limit=2**70) == every and store.list("u", offset=2**70) == []
    for bad in ({"limit": 0}, {"offset": -1}):
        with pytest.raises(InvalidInput, match="limit must be at least 1"):
            store.list("u", **bad)
    # Those added at once (one import, one timestamp) come back in the order given, so that a
    # listing imported again as a backup is the same listing
    from ipm.store import NewMemory

    given = ["zoo_last_one", "abc_first_one", "mmm_mid_one"]
    store.add_many("w", [NewMemory(f"text of {mid}", mid) for mid in given])
    assert [m.id for m in store.list("w")] == given


def test_get_many_is_not_bound_by_sqlites_parameter_limit(store):
    ids = [f"note_many_n{i}" for i in range(30)]
    store.add_many("u", [NewMemory(f"note {i}", mid) for i, mid in enumerate(ids)])
    store._conn().setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 8)  # stands in for 32,766 pending memories
    got = store.get_many("u", [*ids, "note_many_absent"])
    assert sorted(got) == sorted(ids) and got["note_many_n7"].text == "note 7"


def test_the_generation_and_the_log_read_one_namespace_without_reading_every_ask(store):
    store.add("u", "a", "note_a_b")
    gen = store.generation("u")
    store.log_many("other", "ask", [([], {})] * 3000)
    store.log_many("u", "ask", [([], {})] * 10)
    assert store.generation("u") == gen and store.generation("other") == 0  # asks change nothing
    assert len(store.events("u", limit=5)) == 5 and len(store.events("u")) == 11
    plans = [" ".join(str(r[-1]) for r in store._conn().execute("EXPLAIN QUERY PLAN " + sql, ("u",)))
             for sql in ("SELECT MAX(seq) FROM events WHERE namespace = ? AND action != 'ask'",
                         "SELECT * FROM events WHERE namespace = ? ORDER BY seq DESC")]
    assert "changes_by_namespace" in plans[0] and "events_by_namespace" in plans[1], plans


def test_event_log_records_every_write(store):
    store.add("u", "a", "note_a_b")
    store.update("u", "note_a_b", "b")
    store.forget("u", "note_a_b")
    assert [e.action for e in store.events("u")] == ["add", "update", "forget"]
