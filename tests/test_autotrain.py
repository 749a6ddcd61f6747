"""Automatic training (`--train-after`): a namespace is trained once its memories have settled,
once per change, only the namespaces watched. A fake clock drives `AutoTrain.check`; training
is real, on the tiny test model."""

from __future__ import annotations

import pytest

from ipm.autotrain import AutoTrain
from ipm.errors import TrainingError
from tests.conftest import MEMORIES


def test_a_namespace_is_trained_once_its_memories_have_not_changed_for_the_quiet_time(mem):
    trained = []

    def train(ns):
        trained.append(ns)
        mem.train(user=ns)

    auto = AutoTrain(mem, quiet_s=10, train=train, namespaces=["alice"])
    assert auto.check(now=0) == []  # nothing stored yet
    for mid, text in list(MEMORIES.items())[:2]:
        mem.add(text, id=mid, user="alice")
    mem.add("I live in Oslo.", id="place_home_oslo", user="bob")  # not watched
    assert auto.check(now=1) == [] and auto.check(now=10.5) == []  # changed at 1: not quiet yet
    mem.add(MEMORIES["family_sister_anna"], id="family_sister_anna", user="alice")  # a burst goes on
    assert auto.check(now=11) == [] and auto.check(now=20.5) == []
    assert mem.untrained("alice") == sorted(list(MEMORIES)[:3])
    assert auto.check(now=21) == ["alice"] and trained == ["alice"]  # once, after the burst
    assert mem.untrained("alice") == [] and mem.status("alice")["indexed"] == 3
    assert mem.untrained("bob") == ["place_home_oslo"]
    assert auto.check(now=22) == [] and auto.check(now=100) == []  # up to date: no more trainings

    mem.update("family_sister_anna", "My sister Anna moved to Munich.", user="alice")  # changed text
    assert mem.untrained("alice") == ["family_sister_anna"]
    assert auto.check(now=101) == [] and auto.check(now=111) == ["alice"]
    assert mem.untrained("alice") == [] and trained == ["alice", "alice"]
    mem.forget("personal_pet_max", user="alice")  # a forget needs no training (purged at once)
    assert auto.check(now=200) == [] and auto.check(now=300) == [] and trained == ["alice", "alice"]


def test_a_failed_training_is_tried_again_only_after_the_next_change(mem):
    calls = []

    def train(ns):
        calls.append(ns)
        raise TrainingError("a training job is already running for this namespace")

    auto = AutoTrain(mem, quiet_s=5, train=train)  # every namespace that holds memories
    mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max", user="carol")
    assert auto.check(now=0) == [] and auto.check(now=5) == [] and calls == ["carol"]
    assert auto.check(now=50) == [] and calls == ["carol"]  # not on every poll
    mem.add(MEMORIES["work_job_acme"], id="work_job_acme", user="carol")
    assert auto.check(now=51) == [] and auto.check(now=56) == [] and calls == ["carol", "carol"]


def test_a_namespace_another_process_is_training_is_tried_again_at_the_next_poll(mem):
    """`ipm train` under way beside the server: its training is refused (TrainingInProgress),
    and tried again once that one has ended, with no new change needed."""
    from ipm.errors import TrainingInProgress

    calls = []

    def train(ns):
        calls.append(ns)
        if len(calls) == 1:
            raise TrainingInProgress("namespace 'dave' is being trained already")

    auto = AutoTrain(mem, quiet_s=5, train=train)
    mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max", user="dave")
    assert auto.check(now=0) == [] and auto.check(now=5) == [] and calls == ["dave"]
    assert auto.check(now=6) == ["dave"] and calls == ["dave", "dave"]


def test_a_namespace_trained_elsewhere_waits_for_that_training_and_is_tried_if_it_left_memories_out(mem):
    calls, elsewhere, race = [], set(), []

    def train(ns):
        calls.append(ns)
        if race:  # a POST /train job began between the check and this submission
            elsewhere.add(ns)
            raise TrainingError("a training job is already running for this namespace")
        mem.train(user=ns)

    auto = AutoTrain(mem, quiet_s=5, train=train, busy=lambda ns: ns in elsewhere)
    mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max", user="carol")
    mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max", user="dave")
    elsewhere.update({"carol", "dave"})
    assert auto.check(now=0) == [] and auto.check(now=5) == [] and auto.check(now=50) == [] and calls == []
    mem.train(user="dave")
    elsewhere.clear()  # dave's training is done; carol's failed, leaving her memory out
    assert auto.check(now=51) == ["carol"] and calls == ["carol"]
    assert mem.untrained("carol") == [] and mem.untrained("dave") == []

    mem.add(MEMORIES["work_job_acme"], id="work_job_acme", user="carol")
    race.append(True)
    assert auto.check(now=52) == [] and auto.check(now=57) == [] and calls == ["carol", "carol"]
    race.clear()
    elsewhere.clear()  # that job failed too: tried again, with no new change
    assert auto.check(now=58) == ["carol"] and mem.untrained("carol") == []


def test_a_stopped_watcher_starts_no_training_and_says_whether_one_is_under_way(mem):
    calls, under_way = [], []

    def train(ns):
        calls.append(ns)
        under_way.append(auto.stop())  # stopped from inside a training

    auto = AutoTrain(mem, quiet_s=1, train=train)
    mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max", user="dave")
    mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max", user="erin")
    assert auto.check(now=0) == [] and auto.check(now=2) == ["dave"]
    assert calls == ["dave"] and under_way == [True]  # it said one was under way; erin's never started
    assert auto.stop() is False  # none now
    mem.add(MEMORIES["work_job_acme"], id="work_job_acme", user="frank")
    assert auto.check(now=10) == [] and auto.check(now=20) == [] and calls == ["dave"]


def test_the_quiet_time_must_be_positive(mem):
    with pytest.raises(ValueError):
        AutoTrain(mem, quiet_s=0, train=print)


def test_a_namespace_whose_index_cannot_be_read_is_reported_once_and_the_others_go_on(mem, monkeypatch, caplog):
    from ipm.errors import IndexDamaged

    trained, real = [], mem.untrained

    def untrained(ns):
        if ns == "bob":
            raise IndexDamaged("index version .../bob/v0001 cannot be read")
        return real(ns)

    monkeypatch.setattr(mem, "untrained", untrained)
    auto = AutoTrain(mem, quiet_s=1, train=trained.append)
    for ns in ("bob", "carol"):
        mem.add(MEMORIES["personal_pet_max"], id="personal_pet_max", user=ns)
    assert auto.check(now=0) == [] and auto.check(now=2) == ["carol"] and trained == ["carol"]
    assert auto.check(now=3) == [] and auto.check(now=50) == []
    assert [r.getMessage() for r in caplog.records if "bob" in r.getMessage()] == [
        "could not train namespace bob: index version .../bob/v0001 cannot be read"]
