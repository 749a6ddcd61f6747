"""The likelihood rerank (`rerank_likelihood`) on kept candidate scores: does it pay, and at what weight?

    python benchmarks/rerank_kept.py [--json OUT]

Hybrid decoding can rank its best few fused candidates again by the base model's likelihood
of the question given each one's text (`ipm.search.query_likelihood`, `ipm.search.rerank`).
The benchmarks keep every candidate's three scores for every held-out question, so the fusion
can be redone without training; what they do not keep is the likelihood, which needs only the
base model (no adapter): this computes it, with the engine's own function, for the best
`rerank_candidates` candidates under the configured fusion, on the same three kinds of memory
as benchmarks/fusion_kept.py:
  LoCoMo observations and dialog turns, five conversations each: the weight is chosen on
  conv-26/30/41 (the mean of the two kinds' recall@1 there), reported on conv-42/43 too;
  the demo set (paraphrased questions): reported, not chosen on.
Memory texts come from the data files: the LoCoMo IDs are minted again the way the benchmark
minted them (the store's default scheme, in file order). 37 minutes on the 2-core CPU
(fp32); the likelihoods are written beside the results (results/rerank-kept-likelihood.json.gz)
and `--likelihood FILE` scores a grid again from them without the model.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import common
import fusion_kept
import locomo

WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
SETS = fusion_kept.SETS


def texts_of(kind: str, conv_id: str, store) -> dict[str, str]:
    """id -> text of one LoCoMo conversation's memories, minted as benchmarks/locomo.py does."""
    from ipm.store import NewMemory

    conv = json.loads((common.SHARED / "locomo" / f"{conv_id}.json").read_text(encoding="utf-8"))
    added = store.add_many(f"{kind}-{conv_id}", [NewMemory(t, None) for t, _ in locomo.memories(conv, kind)],
                           source="import")
    return {m.id: m.text for m in added}


def fused_order(item: dict, cfg) -> list[tuple[str, float]]:
    """The candidates of one kept question under the configured fusion, best first."""
    from ipm.search import Signals, fuse

    signals = {mid: Signals(*v[:3]) for mid, v in item["candidates"].items()}
    return fuse(signals, cfg.fusion_dense, cfg.fusion_bm25, cfg.fusion_adapter, cfg.fusion_bm25_floor,
                cfg.fusion_bm25_noise)


def likelihoods(sets: dict[str, list[dict]], texts: dict[str, dict[str, str]], questions: dict[str, list[str]],
                cfg, bars) -> dict[str, list[dict[str, float]]]:
    """For each question of each set, {id: log P(question | text)} of its best candidates."""
    import ipm
    from ipm.search import query_likelihood

    with tempfile.TemporaryDirectory() as home:
        base = ipm.open(home, cfg).base()
        out = {}
        for name, items in sets.items():
            out[name] = []
            for i, (item, q) in enumerate(zip(items, questions[name])):
                top = [mid for mid, _ in fused_order(item, cfg)[:cfg.rerank_candidates]]
                scores = query_likelihood(base.model, base.tokenizer, [(q, texts[name][mid]) for mid in top],
                                          base.device)
                out[name].append(dict(zip(top, scores)))
                bars.update(f"likelihood {name}", i + 1, len(items))
    return out


def recall1(items: list[dict], scores: list[dict[str, float]], weight: float, cfg) -> float:
    from ipm.search import rerank

    right = 0
    for item, lk in zip(items, scores):
        ranked = rerank(fused_order(item, cfg), lk, weight)
        right += bool(ranked) and ranked[0][0] in item["gold"]
    return right / (len(items) or 1)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    fusion_kept.kept_arguments(p)
    p.add_argument("--likelihood", type=Path, default=None, metavar="FILE",
                   help="likelihoods written by an earlier run (rerank-kept-likelihood.json.gz) under the same fusion "
                        "settings and rerank_candidates: no model")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N questions of each set (smoke tests)")
    args = p.parse_args(argv)
    cfg = common.config(args)
    info = common.run_info(args.seed, common.command(__file__, argv))
    obs, turns = fusion_kept.load(args.observations), fusion_kept.load(args.turns)
    kept = {"observations": obs, "turns": turns}
    sets = {"observations tune": ("observations", fusion_kept.TUNE), "observations 42/43": ("observations", fusion_kept.HELD),
            "turns tune": ("turns", fusion_kept.TUNE), "turns 42/43": ("turns", fusion_kept.HELD)}
    items, texts, questions = {}, {}, {}
    from ipm.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "ids.db", max_text_bytes=cfg.max_text_bytes, id_scheme=cfg.id_scheme)
        for name, (kind, convs) in sets.items():
            items[name], texts[name], questions[name] = [], {}, []
            for conv_id in convs:
                conv = json.loads((common.SHARED / "locomo" / f"{conv_id}.json").read_text(encoding="utf-8"))
                mint = texts_of(kind, conv_id, store)
                turns_of = {mid: ids for mid, (_, ids) in zip(mint, locomo.memories(conv, kind))}
                asked, _, _ = locomo.scored_questions(conv, turns_of)
                if [sorted(q.gold) for q in asked] != [it["gold"] for it in kept[kind][conv_id]]:
                    raise SystemExit(f"{kind} {conv_id}: the kept questions do not match the ones minted here "
                                     "(another ID scheme or data?)")
                items[name] += kept[kind][conv_id]
                texts[name].update(mint)
                questions[name] += [q.question for q in asked]
        store.close()
    demo_dir = common.REPO / "examples" / "demo"
    items["demo"] = fusion_kept.load(args.demo)
    texts["demo"] = {json.loads(line)["id"]: json.loads(line)["text"]
                     for line in (demo_dir / "memories.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()}
    demo_q = [q for q in json.loads((demo_dir / "questions.json").read_text(encoding="utf-8")) if q.get("memory_id")]
    if [[q["memory_id"]] for q in demo_q] != [it["gold"] for it in items["demo"]]:
        raise SystemExit(f"{args.demo}: its questions are not examples/demo/questions.json's in-scope ones")
    questions["demo"] = [q["question"] for q in demo_q]
    for name in items:
        items[name], questions[name] = items[name][:args.limit], questions[name][:args.limit]

    out_dir = Path(args.out_dir)
    if args.likelihood is not None:
        with gzip.open(args.likelihood, "rt", encoding="utf-8") as f:
            scores = json.load(f)
    else:
        with common.Bars() as bars:
            scores = likelihoods(items, texts, questions, cfg, bars)
        common.write_kept_scores(out_dir / "rerank-kept-likelihood.json.gz", scores)
    grid = []
    for w in WEIGHTS:
        m = {name: recall1(items[name], scores[name], w, cfg) for name in SETS}
        grid.append({"weight": w, "tune": (m["observations tune"] + m["turns tune"]) / 2, **m})
    chosen = max(grid, key=lambda r: (r["tune"], -r["weight"]))
    table = [{"system": f"weight {r['weight']:g}" + (" (off: the fusion alone)" if r["weight"] == 0 else "")
              + (" (chosen)" if r is chosen and r["weight"] else ""),
              "recall@1": r["tune"], **{f"{name} recall@1 %": r[name] for name in SETS}} for r in grid]
    n = {name: len(v) for name, v in items.items()}
    notes = [f"Questions: {', '.join(f'{k} {v}' for k, v in n.items())}. recall@1 of the ranking (IPM's best guess, "
             "also where it would abstain), the configured fusion "
             f"(adapter {cfg.fusion_adapter:g}, dense {cfg.fusion_dense:g}, bm25 {cfg.fusion_bm25:g}, floor "
             f"{cfg.fusion_bm25_floor:g}, noise {cfg.fusion_bm25_noise:g}) with its best {cfg.rerank_candidates} "
             "candidates ranked again by p_fused * exp(weight * log P(question | text)).",
             f"The recall@1 column is the mean of observations and turns on {', '.join(fusion_kept.TUNE)}: the only "
             "figure the weight is chosen on; conv-42/43 and the demo are reported.",
             "Kept scores from " + ", ".join(fusion_kept.shown(p) for p in (args.observations, args.turns, args.demo))
             + "; the adapter's part is the index each of those runs trained, the likelihood the base model's."]
    data = {"benchmark": "rerank-kept", "seed": args.seed, "questions": n, "rerank_candidates": cfg.rerank_candidates,
            "chosen": chosen, "grid": grid, "run": info}
    common.write_results("rerank-kept", data, table, args.out_dir, args.json,
                         title="Likelihood rerank of hybrid candidates: kept candidate scores", notes=notes)
    return data


if __name__ == "__main__":
    main()
