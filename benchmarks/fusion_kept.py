"""One set of fusion weights for facts, dialog turns and paraphrases, from kept candidate scores.

    python benchmarks/fusion_kept.py [--json OUT]

Hybrid decoding fuses three scores per candidate (`ipm.search.fuse`): the adapter's
log-probability, MiniLM's cosine and BM25. The benchmarks keep all three for every candidate
of every held-out question (`*-candidates.json.gz` beside their results), so any fusion can be
scored again without training. This grids the weights and BM25's noise level (`fusion_bm25_noise`:
BM25 score taken off every candidate's, so that a match on one incidental word adds nothing)
over three kinds of memory at once, each with the index its benchmark trained (the kept
scores do not depend on the fusion, so the configuration of that run does not matter here):
  LoCoMo observations (facts) and LoCoMo dialog turns, five conversations each: chosen on
  conv-26/30/41 (the mean of the two variants' recall@1 there), reported on conv-42/43 too;
  the demo set, whose questions are paraphrases written to share few words with their memory:
  a guard, not a target — a choice may not rank it below the configured default.
No training; about a minute here. Writes results/fusion-kept.{json,md,png}.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import common
import locomo

TUNE = ("conv-26", "conv-30", "conv-41")
HELD = ("conv-42", "conv-43")
ADAPTER = (0.0, 0.25, 0.5, 1.0)
DENSE = (10.0, 20.0, 30.0, 40.0, 60.0)
BM25 = (8.0, 16.0, 24.0, 32.0, 48.0, 64.0)
NOISE = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
SETS = ("observations tune", "observations 42/43", "turns tune", "turns 42/43", "demo")


def load(path: Path):
    """Kept scores, refused where the results file beside them says BM25 was not kept raw (the
    noise is in raw bm25s units; locomo.py --reuse turns older scores back into raw ones)."""
    results = path.with_name(path.name.replace("-candidates.json.gz", ".json"))
    if results.exists() and json.loads(results.read_text(encoding="utf-8")).get("bm25_scores", "raw") != "raw":
        raise SystemExit(f"{path}: its BM25 scores were not kept raw ({results}); rank that run again with "
                         "benchmarks/locomo.py --reuse first")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def shown(path: Path) -> str:
    """A path as the notes show it: relative to the repository where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(common.REPO)) if path.is_relative_to(common.REPO) else str(path)


def score(items: list[dict], setting: tuple[float, float, float, float], floor: float) -> tuple[dict, list[bool]]:
    """Recall and MRR of the kept candidates ranked under (adapter, dense, bm25, noise) weights,
    and whether each question's first pick is right."""
    from ipm.evaluate import ranking_metrics

    a, d, b, noise = setting
    rankings = locomo.fused_rankings(items, (a, d, b), floor, noise)
    golds = [frozenset(it["gold"]) for it in items]
    return ranking_metrics(rankings, golds), [bool(r) and r[0] in g for r, g in zip(rankings, golds)]


SIGNALS = {"adapter": (1.0, 0.0, 0.0), "dense": (0.0, 1.0, 0.0), "bm25": (0.0, 0.0, 1.0)}


def ceilings(items: list[dict], floor: float) -> dict:
    """What the kept candidates allow, recall@1 as a fraction: each signal ranking alone; an
    oracle taking, question by question, whichever signal's first pick is right (a fusion can
    still rank first a memory that no signal ranks first, when it is second or third under
    each); the right memory among the candidates at all (recall@1 of a perfect re-ranker)."""
    right = {name: score(items, (*w, 0.0), floor)[1] for name, w in SIGNALS.items()}
    n = len(items) or 1
    out = {f"{name} alone": sum(r) / n for name, r in right.items()}
    out["best signal per question"] = sum(map(any, zip(*right.values()))) / n
    out["among the candidates"] = sum(bool(set(it["gold"]) & set(it["candidates"])) for it in items) / n
    return out


def kept_arguments(p) -> None:
    """The kept candidate scores to read (also benchmarks/rerank_kept.py's)."""
    results = common.REPO / "results"
    p.add_argument("--observations", type=Path, default=results / "locomo-observations-candidates.json.gz")
    p.add_argument("--turns", type=Path, default=results / "locomo-turns-default" / "locomo-turns-candidates.json.gz")
    p.add_argument("--demo", type=Path, default=results / "demo-candidates.json.gz")


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    kept_arguments(p)
    args = p.parse_args(argv)
    cfg = common.config(args)
    info = common.run_info(args.seed, common.command(__file__, argv))
    obs, turns = load(args.observations), load(args.turns)
    sets = {"observations tune": [i for c in TUNE for i in obs[c]],
            "observations 42/43": [i for c in HELD for i in obs[c]],
            "turns tune": [i for c in TUNE for i in turns[c]],
            "turns 42/43": [i for c in HELD for i in turns[c]],
            "demo": load(args.demo)}
    configured = (cfg.fusion_adapter, cfg.fusion_dense, cfg.fusion_bm25, cfg.fusion_bm25_noise)
    # the configured setting first: scaling every weight alike ranks the same, and a tie keeps it
    grid = [(a, d, b, n) for a in ADAPTER for d in DENSE for b in BM25 for n in NOISE]
    grid = list(dict.fromkeys([configured] + grid))
    rows = []
    any_setting = {name: [False] * len(items) for name, items in sets.items()}  # right under some setting
    for setting in grid:
        m = {}
        for name, items in sets.items():
            m[name], right = score(items, setting, cfg.fusion_bm25_floor)
            any_setting[name] = [x or y for x, y in zip(any_setting[name], right)]
        rows.append({"setting": setting, "metrics": m,
                     "tune": (m["observations tune"]["recall@1"] + m["turns tune"]["recall@1"]) / 2,
                     "tune_mrr": (m["observations tune"]["mrr"] + m["turns tune"]["mrr"]) / 2})
    by_tune = lambda r: (r["tune"], r["tune_mrr"])  # noqa: E731
    default = next(r for r in rows if r["setting"] == configured)
    guard = default["metrics"]["demo"]["recall@1"]

    def best(*keep) -> dict | None:
        return max((r for r in rows if all(k(r) for k in keep)), key=by_tune, default=None)

    adapter = lambda r: r["setting"][0] > 0  # noqa: E731  without the adapter it is not IPM
    no_noise = lambda r: r["setting"][3] == 0  # noqa: E731
    guarded = lambda r: r["metrics"]["demo"]["recall@1"] >= guard  # noqa: E731
    picks = {
        "configured default": default,
        "chosen on the tuning conversations": best(adapter),
        "chosen there, no noise": best(adapter, no_noise),
        "chosen there, demo guarded": best(adapter, guarded),
        "chosen there, demo guarded, no noise": best(adapter, no_noise, guarded),
        "retrievers alone, demo guarded": best(lambda r: not adapter(r), guarded),
    }
    picks = {label: r for label, r in picks.items() if r is not None}
    table = []
    for label, r in picks.items():
        a, d, b, n = r["setting"]
        table.append({"system": f"{label} (adapter {a:g}, dense {d:g}, bm25 {b:g}, noise {n:g})",
                      "recall@1": r["tune"],
                      **{f"{name} recall@1 %": r["metrics"][name]["recall@1"] for name in SETS}})
    bounds = {name: {**ceilings(items, cfg.fusion_bm25_floor),
                     "best grid setting for this set alone": max(r["metrics"][name]["recall@1"] for r in rows),
                     "some grid setting per question": sum(any_setting[name]) / (len(items) or 1)}
              for name, items in sets.items()}
    for label in next(iter(bounds.values())):
        table.append({"system": f"ceiling: {label}",
                      "recall@1": (bounds["observations tune"][label] + bounds["turns tune"][label]) / 2,
                      **{f"{name} recall@1 %": bounds[name][label] for name in SETS}})
    n = {name: len(items) for name, items in sets.items()}
    notes = [f"Questions: {', '.join(f'{k} {v}' for k, v in n.items())}. recall@1 of the fused ranking (IPM's "
             "best guess, also where it would abstain); the recall@1 column is the mean of observations and turns on "
             f"{', '.join(TUNE)}, the only figure a choice is made on (the demo may only veto: not below the "
             f"configured default's {100 * guard:.1f}).",
             f"BM25 floor {cfg.fusion_bm25_floor:g} throughout; grid: adapter {ADAPTER}, dense {DENSE}, bm25 {BM25}, "
             f"noise {NOISE}.",
             "Ceilings (not settings): each signal ranking the candidates alone; 'best signal per question' "
             "counts a question right if any one signal ranks its memory first (an oracle; a fusion can still "
             "lift a memory that no signal ranks first); 'best grid setting for this set alone' is the grid's "
             "best on that set's own questions (fixed weights chosen on the test set); 'some grid setting per "
             "question' counts a question right if any setting of the grid ranks its memory first (an oracle "
             "over weights); 'among the candidates' is what a perfect re-ranker of hybrid decoding's candidates "
             "would score.",
             "Kept scores from " + ", ".join(shown(p) for p in (args.observations, args.turns, args.demo)) + "."]
    data = {"benchmark": "fusion-kept", "seed": args.seed, "questions": n, "floor": cfg.fusion_bm25_floor,
            "picks": {k: {"setting": r["setting"], "tune": r["tune"], "metrics": r["metrics"]}
                      for k, r in picks.items()},
            "ceilings": bounds,
            "grid": [{"setting": r["setting"], "tune": r["tune"],
                      **{name: r["metrics"][name]["recall@1"] for name in SETS}} for r in rows],
            "run": info}
    common.write_results("fusion-kept", data, table, args.out_dir, args.json,
                         title="One set of fusion weights: kept candidate scores", notes=notes)
    return data


if __name__ == "__main__":
    main()
