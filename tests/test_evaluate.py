"""`ipm eval`'s metrics: an abstention is a miss at every k; the ranking behind it is scored
apart, like the baselines' rankings."""

import json

import pytest

from ipm.engine import Answer, Hit
from ipm.evaluate import Question, evaluate_ipm


class ScriptedEngine:
    """Answers each question as scripted: (abstained, ranked IDs)."""

    def __init__(self, live, script):
        self.store = type("Store", (), {"ids": lambda _self, user: list(live)})()
        self.script = script

    def ask(self, question, k, user, log):
        abstained, ranked = self.script[question]
        cands = [Hit(i, f"text of {i}", 1.0 / (r + 1)) for r, i in enumerate(ranked[:k])]
        return Answer(question, abstained, [] if abstained else cands, cands)


def test_an_abstention_is_a_miss_at_every_k_and_its_ranking_is_scored_apart():
    live = ["a_b_c", "d_e_f", "g_h_i"]
    script = {
        "right first": (False, ["a_b_c", "d_e_f"]),
        "right second": (False, ["g_h_i", "d_e_f"]),
        "refused, right first": (True, ["d_e_f", "a_b_c"]),
        "wrong": (False, ["g_h_i", "a_b_c"]),
        "off topic, refused": (True, ["a_b_c"]),
        "off topic, answered": (False, ["d_e_f"]),
    }
    questions = [Question("right first", frozenset({"a_b_c"}), "x"),
                 Question("right second", frozenset({"d_e_f"}), "x"),
                 Question("refused, right first", frozenset({"d_e_f"}), "y"),
                 Question("wrong", frozenset({"d_e_f"}), "y"),
                 Question("off topic, refused", None), Question("off topic, answered", None)]
    r = evaluate_ipm(ScriptedEngine(live, script), questions, "default")
    assert r["n"] == 4
    assert r["recall@1"] == pytest.approx(1 / 4)
    assert r["recall@5"] == r["recall@10"] == pytest.approx(2 / 4)  # the refused one is a miss at any k
    assert r["mrr"] == pytest.approx((1 + 1 / 2) / 4)
    assert r["ranking"]["recall@1"] == pytest.approx(2 / 4)
    assert r["ranking"]["recall@5"] == pytest.approx(3 / 4)
    assert r["ranking"]["mrr"] == pytest.approx((1 + 1 / 2 + 1) / 4)
    assert r["abstained"] == pytest.approx(1 / 4)
    assert r["wrong_answer_rate"] == pytest.approx(2 / 4)  # "right second" answered another memory first
    assert r["recall@1"] + r["abstained"] + r["wrong_answer_rate"] == pytest.approx(1.0)
    assert r["out_of_scope"] == {"n": 2, "refused": 0.5}
    assert r["invalid_id_rate"] == 0.0
    assert r["by_category"]["y"]["recall@1"] == 0.0 and r["ranking"]["by_category"]["y"]["recall@1"] == 0.5


def test_latency_is_of_asks_to_a_loaded_engine_and_a_null_category_is_none(tmp_path):
    """The first ask of a process loads the models (seconds): it is made once before the timed
    asks, not counted as a query's latency."""
    import time

    from ipm.evaluate import load_questions

    class Loading(ScriptedEngine):
        loaded = False

        def ask(self, question, k, user, log):
            if not self.loaded:
                time.sleep(1.0)
                self.loaded = True
            return super().ask(question, k, user, log)

    engine = Loading(["a_b_c"], {"one": (False, ["a_b_c"]), "two": (False, ["a_b_c"])})
    r = evaluate_ipm(engine, [Question("one", frozenset({"a_b_c"})), Question("two", frozenset({"a_b_c"}))], "default")
    assert r["recall@1"] == 1.0 and r["latency_ms_p95"] < 500
    path = tmp_path / "q.json"
    path.write_text('[{"question": "one", "memory_id": "a_b_c", "category": null}]')
    assert load_questions(path)[0].category is None


def test_an_id_outside_the_store_counts_as_invalid():
    script = {"q": (False, ["a_b_c", "not_in_store"])}
    r = evaluate_ipm(ScriptedEngine(["a_b_c"], script), [Question("q", frozenset({"a_b_c"}))], "default")
    assert r["invalid_id_rate"] == pytest.approx(1 / 2)


def test_cli_eval_json_reports_recall_with_abstentions_as_misses(tiny_model, memories_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ipm.cli import app

    monkeypatch.setenv("IPM_CACHE", str(tmp_path / "cache"))
    home = str(tmp_path / "clihome")
    runner = CliRunner()
    assert runner.invoke(app, ["import", str(memories_file), "--home", home]).exit_code == 0
    settings = (f"base_model = {json.dumps(str(tiny_model))}\nlora_layers = 2\nepochs = 2\n"
                "questions_per_memory = 4\ndecoding = \"pure\"\n")
    (tmp_path / "clihome" / "ipm.toml").write_text(settings)
    trained = runner.invoke(app, ["train", "--home", home, "--also-calibrate", "hybrid", "--json"])
    assert trained.exit_code == 0, trained.output
    assert set(json.loads(trained.stdout)["metrics"]["calibration"]) == {"pure", "hybrid"}
    qfile = tmp_path / "questions.json"
    qfile.write_text(json.dumps([{"question": "What is my dog called?", "memory_id": "personal_pet_max"},
                                 {"question": "Where does Anna live?", "memory_id": "family_sister_anna"},
                                 {"question": "What is the capital of Peru?", "memory_id": None}]))
    for threshold, abstained in ((0.0, 0.0), (1.01, 1.0)):  # never / always abstain
        (tmp_path / "clihome" / "ipm.toml").write_text(settings + f"abstain_threshold = {threshold}\n")
        res = runner.invoke(app, ["eval", str(qfile), "--home", home, "--baselines", "", "--json"])
        assert res.exit_code == 0, res.output
        r = json.loads(res.stdout)["ipm"]
        assert r["abstained"] == abstained and r["invalid_id_rate"] == 0.0
        assert r["ranking"]["recall@10"] == 1.0  # four memories: every ranking holds the right one
        assert r["recall@10"] == 1.0 - abstained
        assert r["recall@1"] + r["abstained"] + r["wrong_answer_rate"] == pytest.approx(1.0)
    # A file of out-of-scope questions only: refusals scored, no recall to report, no error
    qfile.write_text(json.dumps([{"question": "What is the capital of Peru?", "memory_id": None}]))
    res = runner.invoke(app, ["eval", str(qfile), "--home", home])
    assert res.exit_code == 0, res.output
    assert "out-of-scope questions refused: 1.000 of 1" in " ".join(res.output.split())


def test_a_questions_file_that_cannot_be_read_or_is_malformed_is_one_clear_error(tmp_path):
    from ipm.errors import InvalidInput, NotFound
    from ipm.evaluate import load_questions

    with pytest.raises(NotFound, match="questions file .* does not exist"):
        load_questions(tmp_path / "missing.json")
    with pytest.raises(InvalidInput, match="is a directory"):
        load_questions(tmp_path)
    f = tmp_path / "q.json"
    f.write_bytes(b'[{"question": "caf\xe9?", "memory_id": "a_b_c"}]')  # Latin-1, not UTF-8
    with pytest.raises(InvalidInput, match="not UTF-8 text"):
        load_questions(f)
    for gold in (5, [], [1], {"a_b_c": 1}):
        f.write_text(json.dumps([{"question": "q?", "memory_id": gold}]))
        with pytest.raises(InvalidInput, match="index 0: expected"):
            load_questions(f)
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"question": "q?", "memory_id": ["a_b_c", "d_e_f"]},
                                               {"question": "out?", "memory_id": None}]).encode())
    assert load_questions(f) == [Question("q?", frozenset({"a_b_c", "d_e_f"})), Question("out?", None)]
    # JSON lines are read as an import file is: one line is one record, and only "\n" ends a line
    f.write_text(json.dumps({"question": "q?", "memory_id": "a_b_c"}) + "\n")
    assert load_questions(f) == [Question("q?", frozenset({"a_b_c"}))]
    f.write_text("\n".join(json.dumps({"question": f"where\u2028now {i}?", "memory_id": "a_b_c"}, ensure_ascii=False)
                           for i in (1, 2)))
    assert [q.question for q in load_questions(f)] == ["where\u2028now 1?", "where\u2028now 2?"]
    for bad, says in (("", "line 2: .*empty"), ("x" * 5000, "line 2: question is 5000 characters")):
        f.write_text(json.dumps({"question": "q?", "memory_id": "a_b_c"}) + "\n"
                     + json.dumps({"question": bad, "memory_id": "a_b_c"}) + "\n")
        with pytest.raises(InvalidInput, match=says):
            load_questions(f)


def test_an_unknown_baseline_is_refused_before_anything_is_asked():
    from ipm.errors import InvalidInput
    from ipm.evaluate import evaluate

    with pytest.raises(InvalidInput, match="unknown baseline 'dnse'"):
        evaluate(None, [Question("q?", frozenset({"a_b_c"}))], baselines=["bm25", "dnse"])  # no engine touched


def test_config_and_keys_files_that_cannot_be_read_are_one_clear_error(tmp_path):
    from ipm.config import Config
    from ipm.errors import InvalidInput, NotFound

    with pytest.raises(NotFound, match="config file .* does not exist"):
        Config.from_file(tmp_path / "missing.toml")
    with pytest.raises(InvalidInput, match="config file .* is a directory"):
        Config.from_file(tmp_path)
    f = tmp_path / "ipm.toml"
    f.write_bytes(b"# caf\xe9\nepochs = 2\n")
    with pytest.raises(InvalidInput, match="config file .* is not UTF-8 text"):
        Config.from_file(f)
    f.write_bytes(b"\xef\xbb\xbfepochs = 2\n")  # saved by an editor that writes a byte-order mark
    assert Config.from_file(f).epochs == 2


def test_a_bad_option_in_a_config_file_names_the_file(tmp_path):
    from ipm.config import Config
    from ipm.errors import InvalidInput

    f = tmp_path / "ipm.toml"
    for text, said in (("epochs = 0\n", "epochs must be at least 1"), ("epoch = 2\n", "unknown config option 'epoch'"),
                       ('epochs = "2"\n', "epochs must be a whole number")):
        f.write_text(text)
        with pytest.raises(InvalidInput, match=f"^config file {f}: .*{said}"):
            Config.from_file(f)
