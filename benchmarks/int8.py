"""int8 asks (`quantize = "int8"`) against the model's own dtype, on the same indexes, in one run.

    python benchmarks/int8.py [--home HOME] [--timed 150] [--json OUT]
    python benchmarks/int8.py --locomo [PATH ...] [--variant observations] [--timed 40]

Opens each index twice, once with each setting, asks every in-scope question with both, under
hybrid and pure decoding, and scores each ranking (recall@1/5/10, MRR; the abstention
threshold plays no part) and how many questions get the same first answer. Then it times
single asks of the first --timed questions of each set, the two settings alternating question
by question so that the machine's load hits both alike: p50/p95 and the median of the paired
ratios.

The default set is the demo. HOME must hold a trained default namespace (`bash
scripts/demo.sh` leaves the demo's in .ipm-demo); without --home, or if HOME has no index, the
--memories are imported and trained first (3-4 minutes here for the demo). With --locomo, each
LoCoMo conversation (default: the five in ../shared/data/locomo) is its own namespace, trained
from its memories as benchmarks/locomo.py does, and scored on its qa questions (a hit is a
memory from an evidence turn). Writes results/int8.{json,md,png} (int8-locomo-VARIANT.* with
--locomo).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import common

SETTINGS = ("none", "int8")


def rankings(mem, questions: list[str], user: str) -> list[list[str]]:
    return [[h.id for h in a.candidates] for a in mem.ask_many(questions, k=10, user=user, log=False)]


def timed(mems: dict, questions: list[str], user: str, bars, label: str) -> dict:
    """Single asks, the engines taking turns on each question: seconds per setting."""
    seconds: dict = {name: [] for name in mems}
    for i, q in enumerate(questions):
        for name, mem in mems.items():
            t0 = time.perf_counter()
            mem.ask(q, k=1, user=user, log=False)
            seconds[name].append(time.perf_counter() - t0)
        bars.update(label, i + 1, len(questions))
    return seconds


def latency(seconds: dict) -> dict:
    """p50/p95 in milliseconds, and each setting's median paired ratio to the first's."""
    out = {name: {"p50_ms": round(1000 * statistics.median(s), 1),
                  "p95_ms": round(1000 * sorted(s)[int(0.95 * (len(s) - 1))], 1)} for name, s in seconds.items()}
    base, *others = seconds
    for name in others:
        out[name]["median_ratio"] = round(statistics.median(b / a for a, b in zip(seconds[base], seconds[name])), 3)
    return out


def compare(home: Path, user: str, questions: list, cfg, args, bars) -> dict:
    """Rankings and single-ask seconds of both settings on `user`'s index, under each decoding."""
    import ipm

    texts = [q.question for q in questions]
    # The abstention threshold is left out: 0 keeps every decoding servable, calibrated or not.
    mems = {s: ipm.open(home, config=cfg.updated(quantize=s, abstain_threshold=0.0)) for s in SETTINGS}
    out: dict = {}
    try:
        for decoding in ("hybrid", "pure"):
            ranked = {}
            for s, m in mems.items():
                m.reconfigure(decoding=decoding)
                bars.update(f"{user}: ranking, {decoding}, {s}", 0, 1)
                ranked[s] = rankings(m, texts, user)
                bars.update(f"{user}: ranking, {decoding}, {s}", 1, 1)
            out[decoding] = {"rankings": ranked,
                             "seconds": timed(mems, texts[: args.timed], user, bars, f"{user}: timing {decoding}")}
    finally:
        for m in mems.values():
            m.store.close()
    return out


def demo_sets(home: Path, cfg, args, bars, data: dict) -> dict:
    """{namespace: questions} for the demo: its index trained first if HOME has none."""
    import ipm
    from ipm import index as index_dir
    from ipm.evaluate import load_questions

    mem = ipm.open(home, config=cfg)
    try:
        if index_dir.current_dir(mem.paths.index_root("default")) is None:
            mem.import_(args.memories)
            data["trained"] = mem.train(progress=bars.train("training"))["metrics"]
    finally:
        mem.store.close()
    return {"default": [q for q in load_questions(args.questions) if q.gold is not None]}


def locomo_sets(home: Path, cfg, args, bars, data: dict) -> dict:
    """{conversation: questions} with each conversation's memories trained in its namespace."""
    import ipm
    import locomo
    from ipm.store import NewMemory

    paths = args.locomo or sorted((common.SHARED / "locomo").glob("*.json"))
    if not paths:
        raise SystemExit("no LoCoMo files given and none found in ../shared/data/locomo")
    sets, data["train_seconds"] = {}, {}
    mem = ipm.open(home, config=cfg)
    try:
        for path in paths:
            conv = json.loads(Path(path).read_text(encoding="utf-8"))
            user = conv.get("sample_id") or Path(path).stem
            mems = locomo.memories(conv, args.variant)[: args.limit_memories]
            if mem.store.count(user):  # a home this benchmark filled before: its memories, in their order
                by_text: dict = {}
                for m in mem.store.list(user):
                    by_text.setdefault(m.text, []).append(m)
                added = [by_text[text].pop(0) if by_text.get(text) else None for text, _ in mems]
                if None in added or any(by_text.values()):
                    raise SystemExit(f"namespace {user!r} in {home} holds other memories than {path}; use a fresh --home")
            else:
                added = mem.store.add_many(user, [NewMemory(text) for text, _ in mems], source="import")
            sets[user], _, _ = locomo.scored_questions(conv, {m.id: ids for m, (_, ids) in zip(added, mems)})
            if mem.untrained(user):
                t0 = time.perf_counter()
                mem.train(user=user, progress=bars.train(user))
                data["train_seconds"][user] = round(time.perf_counter() - t0, 1)
    finally:
        mem.store.close()
    return sets


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--memories", type=Path, default=common.REPO / "examples" / "demo" / "memories.jsonl",
                   help="imported and trained when the home has no index (default: the demo set)")
    p.add_argument("--questions", type=Path, default=common.REPO / "examples" / "demo" / "questions.json")
    p.add_argument("--locomo", nargs="*", type=Path, default=None, metavar="PATH",
                   help="LoCoMo conversations instead of the demo (no PATH: the five shared ones)")
    p.add_argument("--variant", choices=("observations", "turns"), default="observations",
                   help="with --locomo: memories are observation facts or dialog turns (default %(default)s)")
    p.add_argument("--limit-memories", type=int, default=None, metavar="N",
                   help="with --locomo: only the first N memories of each conversation (smoke tests)")
    p.add_argument("--timed", type=int, default=None, metavar="N",
                   help="questions timed per decoding and set (default 150; 40 per conversation with --locomo)")
    args = p.parse_args(argv)
    if args.timed is None:
        args.timed = 150 if args.locomo is None else 40

    from ipm.evaluate import ranking_metrics
    from ipm.model import int8_available

    if not int8_available():
        raise SystemExit("this PyTorch has no oneDNN int8 matmul (quantize = 'int8' needs an x86 CPU build)")
    info = common.run_info(args.seed, common.command(__file__, argv))
    common.seed_everything(args.seed)
    cfg = common.config(args).updated(also_calibrate=[])  # no threshold is used here
    data: dict = {"set": "demo" if args.locomo is None else f"locomo {args.variant}", "run": info}
    with common.home(args.home) as home, common.Bars() as bars:
        sets = (demo_sets if args.locomo is None else locomo_sets)(home, cfg, args, bars, data)
        results = {user: compare(home, user, questions, cfg, args, bars) for user, questions in sets.items()}
    golds_of = {user: [q.gold for q in qs] for user, qs in sets.items()}
    golds = [g for gs in golds_of.values() for g in gs]
    data["questions"] = {user: len(qs) for user, qs in sets.items()}
    rows, notes = [], []
    for decoding in ("hybrid", "pure"):
        ranked = {s: [r for res in results.values() for r in res[decoding]["rankings"][s]] for s in SETTINGS}
        seconds = {s: [t for res in results.values() for t in res[decoding]["seconds"][s]] for s in SETTINGS}
        same = sum(a[:1] == b[:1] for a, b in zip(ranked["none"], ranked["int8"]))
        speed = latency(seconds)
        data[decoding] = {s: {**ranking_metrics(ranked[s], golds), **speed[s]} for s in SETTINGS}
        data[decoding]["same_first_answer"] = same
        if len(results) > 1:
            data[decoding]["per_set"] = {user: {s: ranking_metrics(res[decoding]["rankings"][s], golds_of[user])
                                                for s in SETTINGS} for user, res in results.items()}
        for s in SETTINGS:
            m = data[decoding][s]
            rows.append(common.row(f"ipm, {decoding}, {'int8' if s == 'int8' else 'model dtype'}", m,
                                   **{"p50 ms": f"{m['p50_ms']:.0f}", "p95 ms": f"{m['p95_ms']:.0f}",
                                      "time / model dtype's": m.get("median_ratio")}))
        notes.append(f"{decoding}: the same first answer for {same} of {len(golds)} questions")
    timed_n = sum(min(args.timed, len(qs)) for qs in sets.values())
    notes.append(f"timings: single asks (k=1) of the first {args.timed} questions of each set ({timed_n} in all), "
                 "the two settings alternating; the ratio is the median of the paired ratios")
    name = "int8" if args.locomo is None else f"int8-locomo-{args.variant}"
    common.write_results(name, data, rows, args.out_dir, args.json, title=f"int8 asks against the model's dtype, "
                         f"{data['set']}", notes=notes)
    print(common.markdown_table(rows))
    return data


if __name__ == "__main__":
    main()
