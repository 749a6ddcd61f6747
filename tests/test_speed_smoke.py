"""Smoke test for benchmarks/speed.py on the tiny random model: it runs end to end and writes
results with the documented keys and positive numbers (the values mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

RUN_KEYS = ("train_seconds", "index_seconds", "examples_per_second", "latency_k1_p50_ms", "latency_k1_p95_ms",
            "latency_k5_p50_ms", "latency_k5_p95_ms")
TRIE_KEYS = ("tokenize_batch_seconds", "tokenize_one_us_per_id", "build_seconds", "trie_mb", "build_peak_mb",
             "add_one_us", "remove_one_us", "trie_ops_us_per_query", "beam_trie_us_per_query",
             "beam_union_index_us_per_query", "beam_constraint_us_per_query", "beam_steps_per_query",
             "engine_resync_ms")


def test_speed_smoke(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("IPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its sibling `common`
    spec = importlib.util.spec_from_file_location("bench_speed", BENCH / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    out = tmp_path / "results"
    speed.main(["--base-model", str(tiny_model), "--memories", "6", "--epochs", "1", "--questions-per-memory", "3",
                "--trie-sizes", "1000", "--trie-queries", "50", "--threads", "1", "--home", str(tmp_path / "home"),
                "--out-dir", str(out), "--json", str(tmp_path / "copy.json"), "--base-layers", "3", "--set", "lora_layers=2"])

    for suffix in ("json", "md", "png"):
        assert (out / f"speed.{suffix}").stat().st_size > 0
    data = json.loads((out / "speed.json").read_text())
    assert json.loads((tmp_path / "copy.json").read_text()) == data
    assert {"machine", "versions", "seed", "command", "utc"} <= set(data["run"])

    demo = data["model"]["demo"]
    assert demo["memories"] == 6 and demo["train_examples"] > 0 and demo["held_out_questions"] > 0
    for path in ("naive", "default"):
        run = demo[path]
        for key in RUN_KEYS:
            assert run[key] > 0, (path, key, run[key])
        for key in ("recall@1", "recall@5"):
            assert 0.0 <= run[key] <= 1.0
        assert run["train_peak_rss_mb"] >= 0 and run["query_peak_rss_mb"] >= 0
    assert demo["naive"]["adapter_metrics"]["path"] == "naive" and demo["default"]["adapter_metrics"]["path"] == "fast"
    assert demo["ratio_default_over_naive"]["examples_per_second"] > 0
    hybrid = demo["default"]["hybrid"]  # the engine's default query path, single and batched
    for key in ("latency_k1_p50_ms", "latency_k5_p95_ms", "batched_ms_per_question"):
        assert hybrid[key] > 0, key
    assert 0.0 <= hybrid["recall@1"] <= hybrid["recall@5"] <= 1.0
    assert 0.0 <= hybrid["batched_recall@1"] <= 1.0
    # The naive path's adapter asked through hybrid decoding: what the training shortcut costs the answers.
    naive_hybrid = demo["naive"]["hybrid_recall"]
    assert 0.0 <= naive_hybrid["recall@1"] <= naive_hybrid["recall@5"] <= 1.0
    # --base-layers: the default path again on 3 of the 4 layers, its hybrid decoding too.
    fewer = demo["default-3-layers"]
    assert demo["paths"][-1] == "default-3-layers" and fewer["adapter_metrics"]["trained_layers"] == 2
    assert fewer["examples_per_second"] > 0 and fewer["hybrid"]["latency_k1_p50_ms"] > 0

    trie = data["trie"]
    assert trie["vocab_size"] > 0 and trie["sizes"]["1000"]["ids"] == 1000
    for key in TRIE_KEYS:
        assert trie["sizes"]["1000"][key] > 0, (key, trie["sizes"]["1000"][key])
    md = (out / "speed.md").read_text()
    assert "recall@1" in md and "## Trie" in md and "default-3-layers, hybrid decoding" in md
    assert "naive, hybrid decoding" in md
