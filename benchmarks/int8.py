"""int8 asks (`quantize = "int8"`) against the model's own dtype, on one index, in one run.

    python benchmarks/int8.py [--home HOME] [--timed 150] [--json OUT]

Opens the index in HOME twice, once with each setting, asks every in-scope question of
--questions with both, under hybrid and pure decoding, and scores each ranking (recall@1/5/10,
MRR; the abstention threshold plays no part) and how many questions get the same first answer.
Then it times single asks of the first --timed questions, the two settings alternating question
by question so that the machine's load hits both alike: p50/p95 and the median of the paired
ratios. HOME must hold a trained default namespace (`bash scripts/demo.sh` leaves the demo's in
.ipm-demo); without --home, or if HOME has no index, the --memories are imported and trained
first (3-4 minutes here for the demo). Writes results/int8.{json,md,png}.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import common


def rankings(mem, questions: list[str]) -> list[list[str]]:
    return [[h.id for h in a.candidates] for a in mem.ask_many(questions, k=10, log=False)]


def timed(mems: dict, questions: list[str], bars, label: str) -> dict:
    """Single asks, the engines taking turns on each question; milliseconds."""
    seconds: dict = {name: [] for name in mems}
    for i, q in enumerate(questions):
        for name, mem in mems.items():
            t0 = time.perf_counter()
            mem.ask(q, k=1, log=False)
            seconds[name].append(time.perf_counter() - t0)
        bars.update(label, i + 1, len(questions))
    out = {name: {"p50_ms": round(1000 * statistics.median(s), 1),
                  "p95_ms": round(1000 * sorted(s)[int(0.95 * (len(s) - 1))], 1)} for name, s in seconds.items()}
    base, *others = seconds
    for name in others:
        out[name]["median_ratio"] = round(statistics.median(b / a for a, b in zip(seconds[base], seconds[name])), 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--memories", type=Path, default=common.REPO / "examples" / "demo" / "memories.jsonl",
                   help="imported and trained when the home has no index (default: the demo set)")
    p.add_argument("--questions", type=Path, default=common.REPO / "examples" / "demo" / "questions.json")
    p.add_argument("--timed", type=int, default=150, metavar="N", help="questions timed per decoding (default 150)")
    args = p.parse_args(argv)

    import ipm
    from ipm import index as index_dir
    from ipm.evaluate import load_questions, ranking_metrics
    from ipm.model import int8_available

    if not int8_available():
        raise SystemExit("this PyTorch has no oneDNN int8 matmul (quantize = 'int8' needs an x86 CPU build)")
    info = common.run_info(args.seed, common.command(__file__, argv))
    common.seed_everything(args.seed)
    cfg = common.config(args).updated(also_calibrate=[])  # no threshold is used here
    questions = [q for q in load_questions(args.questions) if q.gold is not None]
    texts, golds = [q.question for q in questions], [q.gold for q in questions]
    data: dict = {"questions": len(questions), "run": info}
    with common.home(args.home) as home, common.Bars() as bars:
        mem = ipm.open(home, config=cfg)
        if index_dir.current_dir(mem.paths.index_root("default")) is None:
            mem.import_(args.memories)
            data["trained"] = mem.train(progress=bars.train("training"))["metrics"]
        mem.store.close()
        # The abstention threshold is left out: 0 keeps every decoding servable, calibrated or not.
        mems = {q: ipm.open(home, config=cfg.updated(quantize=q, abstain_threshold=0.0)) for q in ("none", "int8")}
        rows, notes = [], []
        for decoding in ("hybrid", "pure"):
            ranked = {}
            for q, m in mems.items():
                m.reconfigure(decoding=decoding)
                bars.update(f"ranking, {decoding}, {q}", 0, 1)
                ranked[q] = rankings(m, texts)
                bars.update(f"ranking, {decoding}, {q}", 1, 1)
            same = sum(a[:1] == b[:1] for a, b in zip(ranked["none"], ranked["int8"]))
            speed = timed(mems, texts[: args.timed], bars, f"timing {decoding}")
            data[decoding] = {q: {**ranking_metrics(r, golds), **speed[q]} for q, r in ranked.items()}
            data[decoding]["same_first_answer"] = same
            for q in mems:
                m = data[decoding][q]
                rows.append(common.row(f"ipm, {decoding}, {'int8' if q == 'int8' else 'model dtype'}", m,
                                       **{"p50 ms": f"{m['p50_ms']:.0f}", "p95 ms": f"{m['p95_ms']:.0f}",
                                          "time / model dtype's": m.get("median_ratio")}))
            notes.append(f"{decoding}: the same first answer for {same} of {len(texts)} questions")
        for m in mems.values():
            m.store.close()
    notes.append(f"timings: single asks (k=1) of the first {min(args.timed, len(texts))} questions, the two settings "
                 "alternating; the ratio is the median of the paired ratios")
    common.write_results("int8", data, rows, args.out_dir, args.json, title="int8 asks against the model's dtype",
                         notes=notes)
    print(common.markdown_table(rows))
    return data


if __name__ == "__main__":
    main()
