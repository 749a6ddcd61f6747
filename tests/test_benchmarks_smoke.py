"""Smoke tests for benchmarks/: each script runs end to end through its main() on the tiny
random model, and writes the result files with the documented keys. The numbers mean
nothing here; the full runs are in the README of benchmarks (see the script docstrings)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SHARED = ROOT.parent / "shared" / "data"
KS = (1, 5, 10)


def load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their sibling `common`
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data)")


def check_metrics(m: dict) -> None:
    assert m["n"] > 0
    for key in [f"recall@{k}" for k in KS] + ["mrr"]:
        assert 0.0 <= m[key] <= 1.0, (key, m[key])


def check_files(out: Path, name: str) -> dict:
    for suffix in ("json", "md", "png"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0
    assert "recall@1" in (out / f"{name}.md").read_text()
    data = json.loads((out / f"{name}.json").read_text())
    assert {"machine", "versions", "seed", "command", "utc"} <= set(data["run"])
    import common  # the benchmarks' sibling module, on the path once a script is loaded

    machine = data["run"]["machine"]  # which CPU ran it: hosts of one kind differ (AMX or not)
    assert isinstance(machine["cpu"], str) and set(machine["cpu_flags"]) <= common.MATMUL_FLAGS
    if machine["cpu"]:
        assert machine["cpu"] in (out / f"{name}.md").read_text()
    return data


def tiny_args(tiny_model, tmp_path) -> list[str]:
    return ["--base-model", str(tiny_model), "--epochs", "1", "--questions-per-memory", "4",
            "--home", str(tmp_path / "home"), "--out-dir", str(tmp_path / "results")]


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IPM_CACHE", str(tmp_path / "cache"))


def test_dia_ids_normalises_malformed_evidence(monkeypatch):
    locomo = load("locomo", monkeypatch)
    assert locomo.dia_ids("D8:6; D9:17") == {"D8:6", "D9:17"}
    assert locomo.dia_ids(["D:11:26", " D2 : 5", "D"]) == {"D11:26", "D2:5"}
    assert locomo.dia_ids([]) == set()


def test_reference_smoke(tiny_model, tmp_path, monkeypatch):
    need(SHARED / "ipm2-seed")
    reference = load("reference", monkeypatch)
    reference.main(tiny_args(tiny_model, tmp_path) + ["--json", str(tmp_path / "copy.json")])
    data = check_files(tmp_path / "results", "reference")
    assert json.loads((tmp_path / "copy.json").read_text())["sets"] == data["sets"]
    assert data["memories"] == 15 and data["training_questions_given"] == 225
    assert "NOT held-out" in data["sets"]["training"]["description"]
    for name, n in (("training", 225), ("held_out", 75)):
        for system in ("ipm-hybrid", "ipm-pure", "bm25", "dense"):
            check_metrics(data["sets"][name][system])
            assert data["sets"][name][system]["n"] == n


def test_demo_smoke_keeps_the_candidate_scores_it_ranked(tiny_model, tmp_path, monkeypatch):
    demo = load("demo", monkeypatch)
    locomo = load("locomo", monkeypatch)
    data = demo.main(tiny_args(tiny_model, tmp_path))
    check_files(tmp_path / "results", "demo")
    for system in ("ipm-hybrid", "ipm-pure", "bm25", "dense"):
        check_metrics(data[system])
    kept = json.loads(gzip.decompress((tmp_path / "results" / "demo-candidates.json.gz").read_bytes()))
    assert len(kept) == data["n"] == data["ipm-hybrid"]["n"]  # the in-scope questions, each once
    # Ranked again with the run's own fusion, the kept scores give the engine's own figures.
    cfg = data["config"]
    again = locomo.fused_metrics(kept, (cfg["fusion_adapter"], cfg["fusion_dense"], cfg["fusion_bm25"]),
                                 cfg["fusion_bm25_floor"], cfg["fusion_bm25_noise"])
    for key in ("recall@1", "recall@5", "recall@10", "mrr"):
        assert again[key] == pytest.approx(data["ipm-hybrid"][key])


def test_locomo_smoke(tiny_model, tmp_path, monkeypatch, capsys):
    need(SHARED / "locomo" / "conv-26.json")
    locomo = load("locomo", monkeypatch)
    files = [str(SHARED / "locomo" / "conv-26.json"), str(SHARED / "locomo" / "conv-30.json")]
    locomo.main(files + tiny_args(tiny_model, tmp_path) + ["--variant", "observations", "--conversations", "1",
                                                           "--limit-memories", "20", "--out-of-scope", "10"])
    data = check_files(tmp_path / "results", "locomo-observations")
    assert data["conversations"] == ["conv-26"] and data["memories"] == 20
    assert data["skipped_no_gold"] > 0 and data["skipped_no_evidence"] >= 0 and data["train_seconds"]["conv-26"] > 0
    for system in ("ipm-hybrid", "ipm-pure", "bm25", "dense"):
        overall = data["overall"][system]
        check_metrics(overall)
        for cat in overall["by_category"].values():
            check_metrics(cat)
        assert overall == locomo.micro([data["per_conversation"]["conv-26"][system]]) | {
            "skipped_as_misses": overall["skipped_as_misses"]}
    for system in ("ipm-hybrid", "ipm-pure"):
        ipm = data["overall"][system]
        for key in ("abstained", "wrong_answer_rate", "invalid_id_rate", "answered_correct"):
            assert 0.0 <= ipm[key] <= 1.0
        assert ipm["invalid_id_rate"] == 0.0
        assert ipm["latency_ms_p50"] > 0
        assert ipm["out_of_scope"]["n"] == 10 and 0.0 <= ipm["out_of_scope"]["refused"] <= 1.0
    # The fusion sweep: the configured weights re-scored from the kept candidate scores give
    # exactly the recall of the engine's own hybrid ranking.
    sweep = data["fusion_sweep"]
    configured = next(r for r in sweep["grid"] if r["weights"] == sweep["configured"])
    for k in KS:
        assert configured["all"][f"recall@{k}"] == pytest.approx(data["overall"]["ipm-hybrid"][f"recall@{k}"])
    assert sweep["chosen"][0] > 0 and "Fusion weights" in (tmp_path / "results" / "locomo-observations.md").read_text()
    assert (tmp_path / "results" / "locomo-observations-candidates.json.gz").stat().st_size > 0

    # --reuse: conv-26 comes from the run above, untrained; conv-30 is trained; both are scored as one run.
    first = tmp_path / "results" / "locomo-observations.json"
    again = tmp_path / "again"
    args = tiny_args(tiny_model, tmp_path)
    args[args.index("--home") + 1], args[args.index("--out-dir") + 1] = str(tmp_path / "home2"), str(again)
    both = locomo.main(files + args + ["--variant", "observations", "--conversations", "2", "--limit-memories", "20",
                                       "--out-of-scope", "10", "--reuse", str(first)])
    old, new = data["per_conversation"]["conv-26"], both["per_conversation"]["conv-26"]
    assert new.pop("reused_from")["file"] == str(first) and new == old
    assert both["conversations"] == ["conv-26", "conv-30"] and both["per_conversation"]["conv-30"]["train_seconds"] > 0
    assert both["overall"]["ipm-hybrid"] == locomo.micro(
        [both["per_conversation"][c]["ipm-hybrid"] for c in ("conv-26", "conv-30")]) | {
        "skipped_as_misses": both["overall"]["ipm-hybrid"]["skipped_as_misses"]}
    assert both["fusion_sweep"]["n_tune"] == sum(both["per_conversation"][c]["questions"] for c in ("conv-26", "conv-30"))
    assert "reuse" in (again / "locomo-observations.md").read_text()
    # Another configuration is never reused.
    import argparse

    from ipm.config import Config

    ns = argparse.Namespace(variant="observations", seed=0, limit_memories=20, ids="engine")
    convs = {"conv-26": json.loads((SHARED / "locomo" / "conv-26.json").read_text())}
    cfg = Config(**{**data["config"], "epochs": data["config"]["epochs"] + 1})
    assert locomo.reusable([first], ns, cfg, ("ipm-hybrid",), convs) == {}
    assert locomo.reusable([first], argparse.Namespace(**{**vars(ns), "ids": "cluster"}), Config(**data["config"]),
                           ("ipm-hybrid",), convs) == {}
    assert set(locomo.reusable([first], ns, Config(**data["config"]), ("ipm-hybrid",), convs)) == {"conv-26"}
    # Other fusion settings (query-time only): reused, hybrid ranked again from the kept scores
    # with the new settings, and the figures that hang on the old calibration left out.
    data_scores = json.loads(gzip.decompress(
        (tmp_path / "results" / "locomo-observations-candidates.json.gz").read_bytes()))["conv-26"]
    refused_cfg = Config(**{**data["config"], "fusion_bm25": 2.0, "fusion_bm25_floor": 0.0, "fusion_dense": 5.0})
    got = locomo.reusable([first], ns, refused_cfg, ("ipm-hybrid",), convs)["conv-26"]
    want = locomo.fused_metrics(data_scores, (refused_cfg.fusion_adapter, 5.0, 2.0), 0.0, refused_cfg.fusion_bm25_noise)
    assert {k: got["ipm-hybrid"][k] for k in want} == want
    assert "abstained" not in got["ipm-hybrid"] and "out_of_scope" not in got["ipm-hybrid"]
    assert got["ipm-hybrid"]["invalid_id_rate"] == 0.0 and got["reused_from"]["fusion"]["fusion_bm25"] == data["config"]["fusion_bm25"]
    assert set(got["ipm-hybrid"]["by_category"]) == set(data["per_conversation"]["conv-26"]["ipm-hybrid"]["by_category"])
    # Ranked again with the run's own settings, the kept scores give the engine's own figures.
    same = locomo.rescored_hybrid(data["per_conversation"]["conv-26"]["ipm-hybrid"], data_scores, Config(**data["config"]))
    engine = data["per_conversation"]["conv-26"]["ipm-hybrid"]
    for key in ("recall@1", "recall@5", "recall@10", "mrr"):
        assert same[key] == pytest.approx(engine[key])
    for cat, m in engine["by_category"].items():
        assert same["by_category"][cat]["recall@1"] == pytest.approx(m["recall@1"])
    # A run reused without hybrid decoding never passes on hybrid figures of other settings:
    # ranked again where its scores were kept, else left out.
    pure_only = locomo.reusable([first], ns, refused_cfg, ("ipm-pure",), convs)["conv-26"]
    assert pure_only["ipm-hybrid"] == got["ipm-hybrid"]
    unkept = tmp_path / "unkept" / "locomo-observations.json"
    unkept.parent.mkdir()
    unkept.write_text(first.read_text())  # no candidate scores beside it
    assert "ipm-hybrid" not in locomo.reusable([unkept], ns, refused_cfg, ("ipm-pure",), convs)["conv-26"]
    # Under the likelihood rerank the kept scores (which hold no likelihood) cannot rank it again.
    reranked = tmp_path / "reranked" / "locomo-observations.json"
    reranked.parent.mkdir()
    reranked.write_text(json.dumps({**data, "config": {**data["config"], "rerank_likelihood": 1.0}}))
    (reranked.parent / "locomo-observations-candidates.json.gz").write_bytes(
        (tmp_path / "results" / "locomo-observations-candidates.json.gz").read_bytes())
    rerank_cfg = Config(**{**data["config"], "rerank_likelihood": 1.0})
    assert "ipm-hybrid" in locomo.reusable([reranked], ns, rerank_cfg, ("ipm-pure",), convs)["conv-26"]
    moved = Config(**{**data["config"], "rerank_likelihood": 1.0, "fusion_dense": 5.0})
    assert "ipm-hybrid" not in locomo.reusable([reranked], ns, moved, ("ipm-pure",), convs)["conv-26"]
    capsys.readouterr()
    assert locomo.reusable([unkept], ns, Config(**data["config"]), ("ipm-hybrid",), convs) == {}
    assert "conv-26 not reused, its candidate scores are not in" in capsys.readouterr().out
    # A run from before the floor existed (no fusion_bm25_floor in its config) ran without one.
    unfloored = tmp_path / "unfloored" / "locomo-observations.json"
    unfloored.parent.mkdir()
    (unfloored.parent / "locomo-observations-candidates.json.gz").write_bytes(
        (tmp_path / "results" / "locomo-observations-candidates.json.gz").read_bytes())
    unfloored.write_text(json.dumps({**data, "config": {k: v for k, v in data["config"].items() if k != "fusion_bm25_floor"}}))
    got = locomo.reusable([unfloored], ns, Config(**data["config"]), ("ipm-hybrid",), convs)["conv-26"]
    assert got["reused_from"]["fusion"]["fusion_bm25_floor"] == 0.0
    # Nor BM25 noise before it existed: ranked again with this run's noise; only the noise differing is enough.
    unnoised = tmp_path / "unnoised" / "locomo-observations.json"
    unnoised.parent.mkdir()
    (unnoised.parent / "locomo-observations-candidates.json.gz").write_bytes(
        (tmp_path / "results" / "locomo-observations-candidates.json.gz").read_bytes())
    unnoised.write_text(json.dumps({**data, "config": {k: v for k, v in data["config"].items() if k != "fusion_bm25_noise"}}))
    for noise in (data["config"]["fusion_bm25_noise"], 7.0):
        cfg = Config(**{**data["config"], "fusion_bm25_noise": noise})
        got = locomo.reusable([unnoised], ns, cfg, ("ipm-hybrid",), convs)["conv-26"]
        assert got["reused_from"]["fusion"]["fusion_bm25_noise"] == 0.0
        want = locomo.fused_metrics(data_scores, (cfg.fusion_adapter, cfg.fusion_dense, cfg.fusion_bm25),
                                    cfg.fusion_bm25_floor, noise)
        assert {k: got["ipm-hybrid"][k] for k in want} == want
    assert data["config"]["fusion_bm25_noise"] > 0  # so the old run (no noise) differs from this one
    # Reused again, a result keeps its first origin.
    twice = tmp_path / "twice" / "locomo-observations.json"
    twice.parent.mkdir()
    locomo.main(files + args[:args.index("--out-dir")] + ["--out-dir", str(twice.parent), "--variant", "observations",
                                                          "--conversations", "1", "--limit-memories", "20",
                                                          "--out-of-scope", "10", "--reuse", str(first),
                                                          "--set", "fusion_dense=20.0"])
    second = locomo.reusable([twice], ns, Config(**{**data["config"], "fusion_dense": 10.0}), ("ipm-hybrid",), convs)
    assert second["conv-26"]["reused_from"]["file"] == str(first)
    assert second["conv-26"]["reused_from"]["fusion"]["fusion_dense"] == data["config"]["fusion_dense"]
    # Kept scores from before BM25 was kept raw (divided by the question's best) are multiplied back.
    normalised = tmp_path / "normalised" / "locomo-observations.json"
    normalised.parent.mkdir()
    scaled = []
    for it in data_scores:
        best = max(v[2] for v in it["candidates"].values()) or 1.0
        scaled.append({**it, "candidates": {m: [v[0], v[1], v[2] / best] for m, v in it["candidates"].items()}})
    with gzip.open(normalised.with_name("locomo-observations-candidates.json.gz"), "wt") as f:
        json.dump({"conv-26": scaled}, f)
    # Such runs predate expand_retrievers (no such field: off), so the best score is the plain
    # BM25's over the memory texts; this run's kept scores are expanded BM25's, hence the ratio.
    from ipm.retrieve import BM25

    mems = locomo.memories(convs["conv-26"], "observations")[:20]
    questions, _, _ = locomo.scored_questions(convs["conv-26"], {str(i): t for i, (_, t) in enumerate(mems)})
    plain = BM25([str(i) for i in range(len(mems))], [t for t, _ in mems])
    normalised.write_text(json.dumps({**{k: v for k, v in data.items() if k != "bm25_scores"},
                                      "config": {k: v for k, v in data["config"].items() if k != "expand_retrievers"}}))
    old_cfg = Config(**{**data["config"], "expand_retrievers": False})
    back = locomo.reusable([normalised], ns, old_cfg, ("ipm-hybrid",), convs)["conv-26"]["candidate_scores"]
    assert len(back) == len(data_scores) == len(questions)
    for q, a, b in zip(questions, back, data_scores):
        assert a["candidates"].keys() == b["candidates"].keys()
        ratio = max(plain.scores(q.question), default=0.0) / (max(v[2] for v in b["candidates"].values()) or 1.0)
        assert all(x[2] == pytest.approx(y[2] * ratio, rel=1e-6, abs=1e-9)
                   for x, y in zip(a["candidates"].values(), b["candidates"].values()))
    # A run from before a Config field existed matches where this run keeps the field's default.
    older = tmp_path / "older" / "locomo-observations.json"
    older.parent.mkdir()
    (tmp_path / "older" / "locomo-observations-candidates.json.gz").write_bytes(
        (tmp_path / "results" / "locomo-observations-candidates.json.gz").read_bytes())
    old_config = {k: v for k, v in data["config"].items() if k != "hard_negatives"}
    older.write_text(json.dumps({**data, "config": old_config}))
    assert set(locomo.reusable([older], ns, Config(**data["config"]), ("ipm-hybrid",), convs)) == {"conv-26"}
    assert locomo.reusable([older], ns, Config(**{**data["config"], "hard_negatives": 3}), ("ipm-hybrid",), convs) == {}


def test_incremental_smoke(tiny_model, tmp_path, monkeypatch):
    incremental = load("incremental", monkeypatch)
    incremental.main(tiny_args(tiny_model, tmp_path) + ["--old", "10"])
    data = check_files(tmp_path / "results", "incremental")
    assert set(data["runs"]) == {"+10%", "+50%", "+100%"}
    for name, n_new in (("+10%", 1), ("+50%", 5), ("+100%", 10)):
        run = data["runs"][name]
        assert run["new_memories"] == n_new and run["incremental"]["new_memories"] == n_new
        assert run["incremental"]["from_version"] == "v0001"
        for mode in ("hybrid", "pure"):
            check_metrics(run["old"][mode])
            check_metrics(run["new"][mode])
    assert data["runs"]["+100%"]["full_retrain"]["seconds"] > 0


def test_int8_smoke_trains_when_the_home_has_no_index_then_reuses_it(tiny_model, tmp_path, monkeypatch):
    from ipm.model import int8_available

    if not int8_available():
        pytest.skip("this PyTorch has no oneDNN int8 matmul")
    int8 = load("int8", monkeypatch)
    demo = json.loads((ROOT / "examples" / "demo" / "questions.json").read_text())
    questions = tmp_path / "questions.json"  # 40 of the demo's questions, 5 of them out of scope (left out)
    questions.write_text(json.dumps(demo[:35] + demo[-5:]))
    for run in range(2):
        data = int8.main(tiny_args(tiny_model, tmp_path) + ["--timed", "3", "--questions", str(questions)])
        assert ("trained" in data) == (run == 0)
        for decoding in ("hybrid", "pure"):
            for q in ("none", "int8"):
                m = data[decoding][q]
                check_metrics(m)
                assert m["n"] == data["questions"]["default"] == 35 and m["p50_ms"] > 0
            assert 0 <= data[decoding]["same_first_answer"] <= 35 and data[decoding]["int8"]["median_ratio"] > 0
    check_files(tmp_path / "results", "int8")


def test_packed_smoke_asks_with_packed_weights_and_without(tiny_model, tmp_path, monkeypatch):
    from ipm.model import onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("this PyTorch has no oneDNN matmul")
    packed = load("packed", monkeypatch)
    demo = json.loads((ROOT / "examples" / "demo" / "questions.json").read_text())
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(demo[:20] + demo[-3:]))  # 3 out of scope, left out
    data = packed.main(tiny_args(tiny_model, tmp_path) + ["--timed", "3", "--questions", str(questions)])
    assert "float32" in data and "trained" in data
    for dtype in ("float32", "bfloat16"):
        if dtype not in data:
            continue
        for way in ("plain", "packed"):
            check_metrics(data[dtype][way])
            assert data[dtype][way]["n"] == 20 and data[dtype][way]["p50_ms"] > 0
        # the same arithmetic in another memory layout, summed in another order: the same ranking
        # but for a near-tie
        assert data[dtype]["same_first_answer"] >= 19
    assert data["minilm"]["packed"]["median_ratio"] > 0 and data["minilm"]["max_abs_difference"] < 1e-4
    check_files(tmp_path / "results", "packed")


def test_int8_locomo_smoke_trains_each_conversation_and_scores_them_together(tiny_model, tmp_path, monkeypatch):
    from ipm.model import int8_available

    if not int8_available():
        pytest.skip("this PyTorch has no oneDNN int8 matmul")
    need(SHARED / "locomo" / "conv-26.json")
    need(SHARED / "locomo" / "conv-30.json")
    int8 = load("int8", monkeypatch)
    files = [str(SHARED / "locomo" / "conv-26.json"), str(SHARED / "locomo" / "conv-30.json")]
    for run in range(2):  # the second run reuses the home's trained namespaces
        data = int8.main(tiny_args(tiny_model, tmp_path) + ["--locomo", *files, "--limit-memories", "12", "--timed", "2"])
        assert set(data["questions"]) == {"conv-26", "conv-30"} and min(data["questions"].values()) > 0
        assert set(data["train_seconds"]) == (set() if run else {"conv-26", "conv-30"})
        n = sum(data["questions"].values())
        for decoding in ("hybrid", "pure"):
            for q in ("none", "int8"):
                check_metrics(data[decoding][q])
                assert data[decoding][q]["n"] == n
                assert [data[decoding]["per_set"][c][q]["n"] for c in ("conv-26", "conv-30")] == \
                    [data["questions"]["conv-26"], data["questions"]["conv-30"]]
            assert 0 <= data[decoding]["same_first_answer"] <= n
    check_files(tmp_path / "results", "int8-locomo-observations")


def test_question_mix_smoke(tiny_model, tmp_path, monkeypatch):
    need(SHARED / "locomo" / "conv-26.json")
    locomo = load("locomo", monkeypatch)
    mix = load("question_mix", monkeypatch)
    files = [str(SHARED / "locomo" / "conv-26.json"), str(SHARED / "locomo" / "conv-30.json")]
    # a mix's own question kinds win over the ones given for every mix
    mix.main(files + tiny_args(tiny_model, tmp_path) + ["--mixes", "text,wh", "--limit-memories", "15",
                                                        "--out-of-scope", "5", "--question-kinds", "keywords"])
    data = check_files(tmp_path / "results", "question-mix")
    text, wh = data["variants"]["text"], data["variants"]["wh"]
    assert text["config"]["question_kinds"] == [] and wh["config"]["question_kinds"] == ["wh"]
    # The text-only mix trains on one input per memory; wh questions add more.
    assert text["train_examples"] == 15 < wh["train_examples"]
    for run in (text, wh):
        check_metrics(run["overall"]["ipm-hybrid"])
        check_metrics(run["overall"]["ipm-pure"])
    assert (tmp_path / "results" / "question-mix" / "wh" / "locomo-observations.json").is_file()
    # --collate re-tabulates the kept results without training
    (tmp_path / "results" / "question-mix.json").unlink()
    mix.main(files + tiny_args(tiny_model, tmp_path) + ["--mixes", "wh", "--collate"])
    again = json.loads((tmp_path / "results" / "question-mix.json").read_text())
    assert again["variants"]["wh"]["overall"] == wh["overall"]
    # --reuse with other fusion settings trains nothing: pure recall stays, hybrid is ranked again.
    kept = tmp_path / "results" / "question-mix" / "wh" / "locomo-observations.json"
    before = json.loads(kept.read_text())
    before["run"] |= {"git_commit": "0123456789abcdef", "machine": {**before["run"]["machine"], "cuda": "Some GPU"}}
    kept.write_text(json.dumps(before))  # as if trained at another commit, on another machine
    mix.main(files + tiny_args(tiny_model, tmp_path) + ["--mixes", "wh", "--reuse", "--out-of-scope", "5",
                                                        "--limit-memories", "15", "--set", "fusion_dense=5"])
    after = json.loads(kept.read_text())
    assert after["config"]["fusion_dense"] == 5 and after["train_seconds"] == before["train_seconds"]
    assert all("fusion" in r["reused_from"] for r in after["per_conversation"].values())
    assert after["overall"]["ipm-pure"] == before["overall"]["ipm-pure"]
    scores = json.loads(gzip.decompress((kept.parent / "locomo-observations-candidates.json.gz").read_bytes()))
    had = before["config"]
    want = locomo.fused_metrics([i for c in before["per_conversation"] for i in scores[c]],
                                (had["fusion_adapter"], 5.0, had["fusion_bm25"]), had["fusion_bm25_floor"], had["fusion_bm25_noise"])
    assert after["overall"]["ipm-hybrid"]["recall@1"] == pytest.approx(want["recall@1"])
    # The table names the commit and machine the reused conversations were trained at, not this run's.
    assert {r["reused_from"]["commit"] for r in after["per_conversation"].values()} == {"0123456789abcdef"}
    table = json.loads((tmp_path / "results" / "question-mix.json").read_text())["variants"]["wh"]
    assert table["commit"] == "0123456" and table["cuda"] == "Some GPU"
    assert "wh 0123456" in (tmp_path / "results" / "question-mix.md").read_text()
    # An origin recorded before its machine was is "unrecorded", not this run's machine; a
    # variant trained on several machines names them all.
    older = json.loads(json.dumps(after["per_conversation"]["conv-26"]))
    del older["reused_from"]["cuda"]
    after["per_conversation"]["conv-older"] = older
    kept.write_text(json.dumps(after))
    mix.main(files + tiny_args(tiny_model, tmp_path) + ["--mixes", "wh", "--collate"])
    table = json.loads((tmp_path / "results" / "question-mix.json").read_text())["variants"]["wh"]
    assert table["cuda"] == "Some GPU, unrecorded"


def test_recipe_smoke(tiny_model, tmp_path, monkeypatch):
    need(SHARED / "locomo" / "conv-26.json")
    load("locomo", monkeypatch)
    recipe = load("recipe", monkeypatch)
    files = [str(SHARED / "locomo" / "conv-26.json")]
    # --set applies to every recipe; a recipe's own override wins over it.
    recipe.main(files + tiny_args(tiny_model, tmp_path) + ["--recipes", "default,r8", "--limit-memories", "12",
                                                           "--out-of-scope", "5", "--set", "lora_r=4"])
    data = check_files(tmp_path / "results", "recipe")
    default, r8 = data["variants"]["default"], data["variants"]["r8"]
    assert default["config"]["lora_r"] == 4 and (r8["config"]["lora_r"], r8["config"]["lora_alpha"]) == (8, 16)
    assert default["train_examples"] == r8["train_examples"] > 12
    for run in (default, r8):
        check_metrics(run["overall"]["ipm-hybrid"])
    assert "| ipm hybrid, r8 |" in (tmp_path / "results" / "recipe.md").read_text()
    for bad in (["--recipes", "nope"], ["--recipes", ","], ["--set", "lora_r=x"], ["--set", "seed=3"]):
        with pytest.raises(SystemExit):
            recipe.main(files + tiny_args(tiny_model, tmp_path) + bad)


def test_cluster_ids_are_valid_unique_and_topic_first(monkeypatch):
    need(SHARED / "locomo" / "conv-26.json")
    locomo = load("locomo", monkeypatch)
    from ipm.ids import validate_id

    texts = [t for t, _ in locomo.memories(json.loads((SHARED / "locomo" / "conv-26.json").read_text()),
                                           "observations")][:60]
    ids = locomo.cluster_ids(texts, 0)
    assert len(set(ids)) == len(ids) == 60 and all(validate_id(i) for i in ids)
    assert ids == locomo.cluster_ids(texts, 0)  # deterministic
    topics = {i.split("_")[0] for i in ids}
    assert 2 <= len(topics) <= 8  # k = √60 clusters, each labelled by one word
    assert ids[0].split("_")[1] == "caroline"  # then who the fact is about


def test_fusion_transfer_smoke(tmp_path, monkeypatch):
    need(SHARED / "locomo" / "conv-26.json")
    bench = load("fusion_transfer", monkeypatch)
    from ipm import Config

    out = bench.main([str(SHARED / "locomo" / "conv-26.json"), "--limit-memories", "40",
                      "--out-dir", str(tmp_path / "results")])
    data = json.loads((tmp_path / "results" / "fusion-transfer.json").read_text())
    floors = {0.0, 8.0, Config().fusion_bm25_floor}
    assert len(data["grid"]) == 2 * len(floors) * len(bench.DENSE) * len(bench.BM25) and data["rows"] == out["rows"]
    assert {r["bm25 floor"] for r in data["grid"]} == floors
    assert {r["retrievers"] for r in data["grid"]} == {"text", "text + questions"}
    # "dense alone" over the candidates is dense retrieval's own top 1, as the baseline scores it
    from ipm.evaluate import evaluate_baseline, load_questions

    memories = [json.loads(line) for line in (ROOT / "examples" / "demo" / "memories.jsonl").read_text().splitlines()
                if line.strip()]
    questions = load_questions(ROOT / "examples" / "demo" / "questions.json")  # the baseline scores in-scope ones
    dense = evaluate_baseline("dense", [m["id"] for m in memories], [m["text"] for m in memories], questions)
    assert out["rows"][0]["system"] == "dense alone over text" and out["rows"][0]["demo %"] == pytest.approx(dense["recall@1"])
    best = max(r["demo %"] for r in data["grid"])
    assert out["rows"][-1]["demo %"] == best


def test_a_result_records_whether_the_code_differed_from_its_commit(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git binary")
    common = load("common", monkeypatch)
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "x.py").write_text("a = 1\n")
    (repo / "README.md").write_text("docs\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(git + args, check=True)
    monkeypatch.setattr(common, "REPO", repo)
    assert common._git_dirty() is False
    (repo / "README.md").write_text("docs changed\n")  # not code a result depends on
    assert common._git_dirty() is False
    (repo / "src" / "x.py").write_text("a = 2\n")
    assert common._git_dirty() is True and common.run_info(0)["git_dirty"] is True
    monkeypatch.setattr(common, "REPO", tmp_path / "not-a-repo")
    assert common._git_dirty() is None


def test_the_benchmarks_keep_ipms_ranking_recall_and_its_answers_apart(monkeypatch):
    common = load("common", monkeypatch)
    from ipm.evaluate import Question, evaluate_ipm
    from tests.test_evaluate import ScriptedEngine

    script = {"right, answered": (False, ["a_b_c"]), "right, refused": (True, ["d_e_f"]), "wrong": (False, ["a_b_c"])}
    questions = [Question("right, answered", frozenset({"a_b_c"}), "x"), Question("right, refused", frozenset({"d_e_f"}), "x"),
                 Question("wrong", frozenset({"d_e_f"}), "y")]
    m = common.ranked_layout(evaluate_ipm(ScriptedEngine(["a_b_c", "d_e_f"], script), questions, "default"))
    assert m["recall@1"] == pytest.approx(2 / 3) and m["answered_correct"] == pytest.approx(1 / 3)
    assert m["by_category"]["x"]["recall@1"] == 1.0 and "ranking" not in m
    assert m["abstained"] == pytest.approx(1 / 3) and m["wrong_answer_rate"] == pytest.approx(1 / 3)
    # no in-scope question at all: nothing answered right, no error
    none = common.ranked_layout(evaluate_ipm(ScriptedEngine(["a_b_c"], {"q": (True, ["a_b_c"])}), [Question("q", None)], "default"))
    assert none["n"] == 0 and none["answered_correct"] == 0.0 and none["out_of_scope"]["refused"] == 1.0


def test_fusion_kept_chooses_on_the_tuning_conversations_under_the_demo_guard(tmp_path, monkeypatch):
    """Synthetic kept scores where LoCoMo's questions need BM25's weight and the demo's
    paraphrases are misled by one incidental shared word (BM25 4): no weights without noise
    serve both, taking the noise off does."""
    bench = load("fusion_kept", monkeypatch)

    def item(gold_bm25, gold_dense, other_bm25, other_dense):
        return {"gold": ["g_o_ld"], "category": "1",
                "candidates": {"g_o_ld": [-0.7, gold_dense, gold_bm25], "o_th_er": [-0.7, other_dense, other_bm25]}}

    locomo_like = [item(5.0, 0.30, 0.0, 0.45)] * 2  # right only with weight on BM25
    convs = {c: locomo_like for c in ("conv-26", "conv-30", "conv-41", "conv-42", "conv-43")}
    files = {}
    for name, data in (("locomo-observations", convs), ("locomo-turns", convs),
                       ("demo", [item(0.0, 0.60, 4.0, 0.50)] * 3)):  # right unless one shared word counts
        files[name] = tmp_path / "kept" / f"{name}-candidates.json.gz"
        files[name].parent.mkdir(exist_ok=True)
        with gzip.open(files[name], "wt") as f:
            json.dump(data, f)
    old = ["--set", "fusion_adapter=0.5", "--set", "fusion_dense=40", "--set", "fusion_bm25=16", "--set", "fusion_bm25_noise=0"]
    argv = ["--observations", str(files["locomo-observations"]), "--turns", str(files["locomo-turns"]),
            "--demo", str(files["demo"]), "--out-dir", str(tmp_path / "results")]
    data = bench.main(argv + old)
    check_files(tmp_path / "results", "fusion-kept")
    for name, bound in data["ceilings"].items():  # an oracle over the grid is above any one setting of it
        assert (bound["some grid setting per question"] >= bound["best grid setting for this set alone"]
                >= data["picks"]["configured default"]["metrics"][name]["recall@1"])
    assert data["ceilings"]["demo"]["best grid setting for this set alone"] == 1.0
    picks = data["picks"]
    configured = picks["configured default"]
    assert configured["setting"] == (0.5, 40.0, 16.0, 0.0)
    assert configured["tune"] == 0.0 and configured["metrics"]["demo"]["recall@1"] == 1.0
    guarded = picks["chosen there, demo guarded"]
    assert guarded["tune"] == 1.0 and guarded["metrics"]["demo"]["recall@1"] == 1.0 and guarded["setting"][3] > 0
    assert guarded["setting"][0] > 0 and picks["retrievers alone, demo guarded"]["setting"][0] == 0
    assert picks["chosen there, demo guarded, no noise"]["tune"] < 1.0  # no weights alone serve both
    unguarded = picks["chosen on the tuning conversations"]
    assert unguarded["tune"] == 1.0 and all(unguarded["tune"] >= p["tune"] for p in picks.values())
    # Where every setting ranks alike, the configured one is kept.
    flat = [item(1.0, 0.5, 1.0, 0.5) | {"candidates": {"g_o_ld": [-0.1, 0.5, 1.0]}}] * 2
    with gzip.open(files["demo"], "wt") as f:
        json.dump(flat, f)
    for name in ("locomo-observations", "locomo-turns"):
        with gzip.open(files[name], "wt") as f:
            json.dump({c: flat for c in convs}, f)
    tied = bench.main(argv + old)["picks"]
    assert tied["chosen on the tuning conversations"]["setting"] == (0.5, 40.0, 16.0, 0.0)
    # BM25 scores kept divided by the best (older runs) are refused: the noise is in raw units.
    (files["locomo-turns"].parent / "locomo-turns.json").write_text(json.dumps({"bm25_scores": "divided by the best"}))
    with pytest.raises(SystemExit, match="not kept raw"):
        bench.main(argv)


def test_fusion_kept_ceilings_count_what_each_signal_and_the_candidates_allow(monkeypatch):
    bench = load("fusion_kept", monkeypatch)

    def item(gold, adapter, dense, bm25):  # three candidates a, b, c; each list is their scores
        return {"gold": [gold], "candidates": {m: [adapter[i], dense[i], bm25[i]] for i, m in enumerate("abc")}}

    items = [item("a", [-0.1, -2, -3], [0.1, 0.5, 0.2], [0, 0, 9]),  # the adapter alone is right
             item("b", [-0.1, -2, -3], [0.1, 0.5, 0.2], [0, 0, 9]),  # dense alone
             item("c", [-0.1, -2, -3], [0.1, 0.5, 0.2], [0, 0, 9]),  # BM25 alone
             item("c", [-0.1, -2, -3], [0.9, 0.5, 0.2], [5, 0, 0]),  # none, though among the candidates
             item("z", [-0.1, -2, -3], [0.1, 0.5, 0.2], [0, 0, 9])]  # not among the candidates
    got = bench.ceilings(items, floor=16.0)
    assert got == {"adapter alone": 0.2, "dense alone": 0.2, "bm25 alone": 0.2,
                   "best signal per question": 0.6, "among the candidates": 0.8}


def test_rerank_kept_smoke_scores_the_likelihood_and_again_from_its_file(tiny_model, tmp_path, monkeypatch):
    need(SHARED / "locomo" / "conv-43.json")
    bench = load("rerank_kept", monkeypatch)
    argv = ["--base-model", str(tiny_model), "--limit", "3", "--out-dir", str(tmp_path / "results"),
            "--set", "rerank_candidates=4"]
    data = bench.main(argv)
    check_files(tmp_path / "results", "rerank-kept")
    assert data["questions"] == {name: 3 for name in bench.SETS}
    with gzip.open(tmp_path / "results" / "rerank-kept-likelihood.json.gz", "rt") as f:
        kept = json.load(f)
    assert all(len(q) == 4 and all(v < 0 for v in q.values()) for name in bench.SETS for q in kept[name])
    from ipm import Config

    off = next(r for r in data["grid"] if r["weight"] == 0)  # weight 0 is the fusion alone
    demo = bench.fusion_kept.load(ROOT / "results" / "demo-candidates.json.gz")[:3]
    assert off["demo"] == pytest.approx(sum(bench.fused_order(it, Config())[0][0] in it["gold"] for it in demo) / 3)
    assert data["chosen"]["tune"] == max(r["tune"] for r in data["grid"])
    # A hand-made question whose likelihood turns the fusion's order around.
    item = {"gold": ["b_b_b"], "candidates": {"a_a_a": [-0.1, 0.6, 0.0], "b_b_b": [-0.2, 0.5, 0.0]}}
    read = {"a_a_a": -30.0, "b_b_b": -10.0}
    assert bench.recall1([item], [read], 0.0, Config()) == 0.0 and bench.recall1([item], [read], 1.0, Config()) == 1.0
    again = bench.main(argv + ["--likelihood", str(tmp_path / "results" / "rerank-kept-likelihood.json.gz")])
    assert again["grid"] == data["grid"]
