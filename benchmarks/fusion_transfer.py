"""Do hybrid decoding's fusion weights transfer from LoCoMo to the demo set? Retrievers only.

    python benchmarks/fusion_transfer.py [--json OUT]

Hybrid decoding's weights were chosen on LoCoMo (conv-26/30/41 observations). This scores the
two retrievers fused without the adapter (`ipm.search.fuse` over the engine's own candidates,
`ipm.retrieve.Candidates`) for a grid of (dense, bm25) weights on LoCoMo observations and
turns and on the demo set, whose questions are paraphrases by design: where the weights that
win on LoCoMo lose on the demo, no one setting serves both. No training; a few minutes.
Writes results/fusion-transfer.{json,md,png}.
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import locomo

DENSE = (5.0, 10.0, 20.0, 40.0)
BM25 = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
TUNE = ("conv-26", "conv-30", "conv-41")


def items(ids: list[str], texts: list[str], questions: list, encoder, n: int) -> list[dict]:
    """Per ipm.evaluate.Question, its hybrid candidates' scores in the form locomo.py keeps them
    ({"gold", "candidates": {id: [adapter 0, cosine, bm25]}}), to be ranked by locomo.fused_metrics."""
    from ipm.retrieve import Candidates

    feats = Candidates(ids, texts, encoder).many([q.question for q in questions], n)
    return [{"gold": sorted(q.gold), "candidates": {m: [0.0, c, b] for m, (c, b) in f.items()}}
            for f, q in zip(feats, questions)]


def recall_at_1(sets: list[list[dict]], dense: float, bm25: float, floor: float) -> float:
    scored = [it for s in sets for it in s]
    return locomo.fused_metrics(scored, (0.0, dense, bm25), floor)["recall@1"] if scored else 0.0


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="LoCoMo conversation files (default ../shared/data/locomo/*.json)")
    p.add_argument("--limit-memories", type=int, default=None, metavar="N",
                   help="keep only the first N memories of each conversation (smoke tests)")
    args = p.parse_args(argv)
    paths = args.paths or sorted((common.SHARED / "locomo").glob("*.json"))
    from ipm import Config
    from ipm.evaluate import load_questions
    from ipm.retrieve import load_dense_encoder

    info = common.run_info(args.seed, common.command(__file__, argv))
    n = Config().hybrid_candidates
    encoder = load_dense_encoder()
    data: dict[str, list[tuple]] = {}
    for variant in ("observations", "turns"):
        for path in paths:
            conv = json.loads(path.read_text())
            mems = locomo.memories(conv, variant)[: args.limit_memories]
            ids = [f"m{i}" for i in range(len(mems))]
            qs, _, _ = locomo.scored_questions(conv, {mid: turns for mid, (_, turns) in zip(ids, mems)})
            data[f"{variant}:{path.stem}"] = items(ids, [t for t, _ in mems], qs, encoder, n)
            print(f"{variant} {path.stem}: {len(mems)} memories, {len(qs)} questions", flush=True)
    demo = [json.loads(line) for line in (common.REPO / "examples" / "demo" / "memories.jsonl").read_text().splitlines() if line.strip()]
    questions = [q for q in load_questions(common.REPO / "examples" / "demo" / "questions.json") if q.gold is not None]
    data["demo"] = items([m["id"] for m in demo], [m["text"] for m in demo], questions, encoder, n)
    groups = {  # column names end in "%": shown in % by common.markdown_table
        "LoCoMo obs, tuning 26/30/41 %": [f"observations:{c}" for c in TUNE if f"observations:{c}" in data],
        "LoCoMo obs, 42/43 %": [k for k in data if k.startswith("observations:") and k.split(":")[1] not in TUNE],
        "LoCoMo turns, five %": [k for k in data if k.startswith("turns:")],
        "demo %": ["demo"],
    }
    cfg = Config()
    floors = sorted({0.0, cfg.fusion_bm25_floor})
    grid = [{"dense": d, "bm25": b, "bm25 floor": f,
             **{g: recall_at_1([data[k] for k in keys], d, b, f) for g, keys in groups.items()}}
            for f in floors for d in DENSE for b in BM25]
    first = next(iter(groups))
    def name(r: dict) -> str:
        return f"dense {r['dense']:g}, bm25 {r['bm25']:g}, floor {r['bm25 floor']:g}"

    rows = [{"system": "dense alone", **{g: recall_at_1([data[k] for k in keys], 1.0, 0.0, 0.0) for g, keys in groups.items()}}]
    for f in floors:
        chosen = max((r for r in grid if r["bm25 floor"] == f), key=lambda r: r[first])
        rows.append({"system": f"chosen on LoCoMo tuning: {name(chosen)}", **{g: chosen[g] for g in groups}})
    configured = next((r for r in grid if (r["dense"], r["bm25"], r["bm25 floor"])
                       == (cfg.fusion_dense, cfg.fusion_bm25, cfg.fusion_bm25_floor)), None)
    if configured:
        rows.append({"system": f"configured: {name(configured)}", **{g: configured[g] for g in groups}})
    best_demo = max(grid, key=lambda r: r["demo %"])
    rows.append({"system": f"best on demo: {name(best_demo)}", **{g: best_demo[g] for g in groups}})
    notes = [(f"recall@1 of BM25 + dense fused without the adapter over hybrid decoding's candidates (top {n} of "
              "each); ranking = ipm.search.fuse with adapter weight 0. Floor 0: BM25 scores divided by the "
              "question's best one; otherwise by max(best, floor), which keeps weak lexical matches weak."),
             ("The 'best on demo' row is chosen on the demo's own held-out questions: it shows the trade-off, "
              "and is not a setting to use.")]
    common.write_results("fusion-transfer", {"benchmark": "fusion-transfer", "seed": args.seed, "grid": grid,
                                             "rows": rows, "run": info},
                         rows, args.out_dir, args.json, title="Fusion weights: LoCoMo against the demo set (retrievers only)",
                         notes=notes)
    return {"grid": grid, "rows": rows}


if __name__ == "__main__":
    main()
