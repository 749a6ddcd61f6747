"""Do hybrid decoding's fusion weights transfer from LoCoMo to the demo set? Retrievers only.

    python benchmarks/fusion_transfer.py [--json OUT]

Hybrid decoding's weights were once chosen on LoCoMo (conv-26/30/41 observations). This scores the
two retrievers fused without the adapter (`ipm.search.fuse` over the engine's own candidates,
`ipm.retrieve.Candidates`) for a grid of (dense, bm25) weights on LoCoMo observations and
turns and on the demo set, whose questions are paraphrases by design: where the weights that
win on LoCoMo lose on the demo, no one setting serves both. Each is scored twice: retrievers
over the memory texts, and over the texts with each memory's built-in training questions
(`expand_retrievers`; the engine leaves out the 10% it holds back for calibration, this keeps
them). No training; about a minute here for observations, 25 with turns. Writes results/fusion-transfer.{json,md,png}.
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import locomo

DENSE = (5.0, 10.0, 20.0, 40.0)
BM25 = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
TUNE = ("conv-26", "conv-30", "conv-41")


RETRIEVERS = ("text", "text + questions")


def minted(texts: list[str], cfg) -> list[str]:
    """IDs as the store mints them, in order (the built-in questions are made from the ID too)."""
    from ipm.ids import mint_id

    taken: set[str] = set()
    out = []
    for text in texts:
        out.append(mint_id(text, taken, cfg.id_scheme))
        taken.add(out[-1])
    return out


def items(ids: list[str], texts: list[str], questions: list, encoder, n: int, cfg=None) -> list[dict]:
    """Per ipm.evaluate.Question, its hybrid candidates' scores in the form locomo.py keeps them
    ({"gold", "candidates": {id: [adapter 0, cosine, bm25]}}), to be ranked by locomo.fused_metrics.
    With `cfg`, the retrievers also match each memory's built-in training questions."""
    from ipm.questions import Aliases, builtin_questions
    from ipm.retrieve import Candidates

    expansion = q_emb = None
    if cfg is not None:
        aliases = Aliases(texts)
        expansion = [builtin_questions(i, t, cfg.questions_per_memory, cfg.seed, cfg.question_kinds, aliases=aliases)[1:]
                     for i, t in zip(ids, texts)]
        flat = encoder.encode([q for qs in expansion for q in qs]).cpu()
        q_emb = list(flat.split([len(qs) for qs in expansion]))
    feats = Candidates(ids, texts, encoder, None, expansion, q_emb).many([q.question for q in questions], n)
    return [{"gold": sorted(q.gold), "candidates": {m: [0.0, c, b] for m, (c, b) in f.items()}}
            for f, q in zip(feats, questions)]


def recall_at_1(sets: list[list[dict]], dense: float, bm25: float, floor: float) -> float:
    scored = [it for s in sets for it in s]
    return locomo.fused_metrics(scored, (0.0, dense, bm25), floor)["recall@1"] if scored else 0.0


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="LoCoMo conversation files (default ../shared/data/locomo/*.json)")
    p.add_argument("--variants", default="observations,turns",
                   help="LoCoMo memory variants to score (turns with questions: about 25 minutes here)")
    p.add_argument("--limit-memories", type=int, default=None, metavar="N",
                   help="keep only the first N memories of each conversation (smoke tests)")
    args = p.parse_args(argv)
    paths = args.paths or sorted((common.SHARED / "locomo").glob("*.json"))
    from ipm import Config
    from ipm.evaluate import load_questions
    from ipm.retrieve import load_dense_encoder

    info = common.run_info(args.seed, common.command(__file__, argv))
    cfg = Config()
    n = cfg.hybrid_candidates
    encoder = load_dense_encoder()
    data: dict[str, list[tuple]] = {}  # "<retrievers>|<set>" -> items
    sets: list[tuple[str, list[str], list[str], list]] = []  # (name, ids, texts, questions)
    for variant in args.variants.split(","):
        for path in paths:
            conv = json.loads(path.read_text())
            mems = locomo.memories(conv, variant)[: args.limit_memories]
            texts = [t for t, _ in mems]
            ids = minted(texts, cfg)
            qs, _, _ = locomo.scored_questions(conv, {mid: turns for mid, (_, turns) in zip(ids, mems)})
            sets.append((f"{variant}:{path.stem}", ids, texts, qs))
    demo = [json.loads(line) for line in (common.REPO / "examples" / "demo" / "memories.jsonl").read_text().splitlines() if line.strip()]
    questions = [q for q in load_questions(common.REPO / "examples" / "demo" / "questions.json") if q.gold is not None]
    sets.append(("demo", [m["id"] for m in demo], [m["text"] for m in demo], questions))
    for name, ids, texts, qs in sets:
        for retrievers in RETRIEVERS:
            data[f"{retrievers}|{name}"] = items(ids, texts, qs, encoder, n, cfg if retrievers != "text" else None)
        print(f"{name}: {len(ids)} memories, {len(qs)} questions", flush=True)
    names = [name for name, *_ in sets]
    groups = {  # column names end in "%": shown in % by common.markdown_table
        "LoCoMo obs, tuning 26/30/41 %": [f"observations:{c}" for c in TUNE if f"observations:{c}" in names],
        "LoCoMo obs, 42/43 %": [k for k in names if k.startswith("observations:") and k.split(":")[1] not in TUNE],
        "LoCoMo turns, five %": [k for k in names if k.startswith("turns:")],
        "demo %": ["demo"],
    }
    groups = {g: keys for g, keys in groups.items() if keys}
    floors = sorted({0.0, 8.0, cfg.fusion_bm25_floor})

    def scores(retrievers: str, d: float, b: float, f: float) -> dict:
        return {g: recall_at_1([data[f"{retrievers}|{k}"] for k in keys], d, b, f) for g, keys in groups.items()}

    grid = [{"retrievers": r, "dense": d, "bm25": b, "bm25 floor": f, **scores(r, d, b, f)}
            for r in RETRIEVERS for f in floors for d in DENSE for b in BM25]
    first = next(iter(groups))

    def name(r: dict) -> str:
        return f"over {r['retrievers']}: dense {r['dense']:g}, bm25 {r['bm25']:g}, floor {r['bm25 floor']:g}"

    rows = [{"system": f"dense alone over {r}", **scores(r, 1.0, 0.0, 0.0)} for r in RETRIEVERS]
    rows += [{"system": f"BM25 alone over {r}", **scores(r, 0.001, 1.0, 0.0)} for r in RETRIEVERS]  # dense breaks ties
    for r in RETRIEVERS:
        for f in floors:
            chosen = max((x for x in grid if (x["retrievers"], x["bm25 floor"]) == (r, f)), key=lambda x: x[first])
            rows.append({"system": f"chosen on LoCoMo tuning {name(chosen)}", **{g: chosen[g] for g in groups}})
    configured = next((x for x in grid if (x["retrievers"], x["dense"], x["bm25"], x["bm25 floor"])
                       == (RETRIEVERS[cfg.expand_retrievers], cfg.fusion_dense, cfg.fusion_bm25, cfg.fusion_bm25_floor)), None)
    if configured:
        rows.append({"system": f"configured {name(configured)}", **{g: configured[g] for g in groups}})
    best_demo = max(grid, key=lambda x: x["demo %"])
    rows.append({"system": f"best on demo {name(best_demo)}", **{g: best_demo[g] for g in groups}})
    notes = [(f"recall@1 of BM25 + dense fused without the adapter over hybrid decoding's candidates (top {n} of "
              "each); ranking = ipm.search.fuse with adapter weight 0. Floor 0: BM25 scores divided by the "
              "question's best one; otherwise by max(best, floor), which keeps weak lexical matches weak. No BM25 "
              "noise (fusion_bm25_noise 0): this study predates it (see benchmarks/fusion_kept.py)."),
             ("'over text + questions': both retrievers also match each memory's built-in training questions "
              "(expand_retrievers; see ipm.retrieve). BM25 alone over candidates is BM25's own top 1 where it "
              "matches a word, else dense's."),
             ("The 'best on demo' row is chosen on the demo's own held-out questions: it shows the trade-off, "
              "and is not a setting to use.")]
    common.write_results("fusion-transfer", {"benchmark": "fusion-transfer", "seed": args.seed, "grid": grid,
                                             "rows": rows, "run": info},
                         rows, args.out_dir, args.json, title="Fusion weights: LoCoMo against the demo set (retrievers only)",
                         notes=notes)
    return {"grid": grid, "rows": rows}


if __name__ == "__main__":
    main()
