"""The IPM 2.0 reference setup, measured honestly.

The reference implementation reported "91% top-1 exact recall" on questions taken from its
own training file. We train on the same 15 memories and 225 training questions, then score
IPM, BM25 and dense retrieval twice: on those training questions (to compare with the
reference figure; NOT held-out) and on 75 hand-written held-out questions
(examples/reference/questions.json), which is the number that says how well recall works.

    python benchmarks/reference.py            # writes results/reference.{json,md,png}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common

SETS = {  # name: (table label, description)
    "training": ("training Qs, NOT held-out", "the 225 training questions themselves, NOT held-out "
                                              "(the reference's own 91% was measured like this)"),
    "held_out": ("held-out Qs", "75 held-out questions, written by hand, never trained on"),
}
SYSTEMS = ("ipm-hybrid", "ipm-pure", "bm25", "dense")


def training_questions(path: Path):
    """The reference's train_data.json as evaluation questions (each names one memory)."""
    from ipm.evaluate import Question

    return [Question(r["question"], frozenset([r["memory_id"]])) for r in json.loads(path.read_text(encoding="utf-8"))]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--memories", type=Path, default=common.SHARED / "ipm2-seed" / "memories.json",
                   help="reference memories (default ../shared/data/ipm2-seed/memories.json)")
    p.add_argument("--train-data", type=Path, default=common.SHARED / "ipm2-seed" / "train_data.json",
                   help="reference training questions (default ../shared/data/ipm2-seed/train_data.json)")
    p.add_argument("--questions", type=Path, default=common.REPO / "examples" / "reference" / "questions.json",
                   help="held-out questions (default examples/reference/questions.json)")
    p.add_argument("--user", default="reference", help="ipm namespace to use (default %(default)s)")
    args = p.parse_args(argv)

    import ipm
    from ipm.evaluate import load_questions

    info = common.run_info(args.seed, common.command(__file__, argv))
    common.seed_everything(args.seed)
    cfg = common.config(args)
    sets = {"training": training_questions(args.train_data), "held_out": load_questions(args.questions)}
    with common.home(args.home) as home, common.Bars() as bars:
        mem = ipm.open(home, config=cfg)
        if mem.store.count(args.user):
            raise SystemExit(f"namespace {args.user!r} in {home} already has memories; use a fresh --home")
        n_memories = mem.import_(args.memories, user=args.user).memories
        n_given = mem.import_(args.train_data, user=args.user).questions
        t0 = time.perf_counter()
        manifest = mem.train(user=args.user, progress=bars.train("reference"))
        train_seconds = time.perf_counter() - t0
        reports = {name: common.evaluate_systems(mem, qs, args.user, bars, name) for name, qs in sets.items()}
        for name, qs in sets.items():
            reports[name]["n"] = sum(q.gold is not None for q in qs)
        mem.store.close()

    data = {
        "benchmark": "reference",
        "seed": args.seed,
        "inputs": {k: str(getattr(args, k)) for k in ("memories", "train_data", "questions")},
        "memories": n_memories,
        "training_questions_given": n_given,
        "training": {"seconds": round(train_seconds, 2), "threshold": manifest["threshold"],
                     "metrics": manifest["metrics"]},
        "config": cfg.to_dict(),
        "sets": {name: {"description": SETS[name][1], "n": reports[name]["n"],
                        **{s: reports[name][s] for s in SYSTEMS}} for name in sets},
        "run": info,
    }
    rows = [common.row(f"{s}, {SETS[name][0]}", reports[name][s], **common.answer_columns(reports[name][s]))
            for name in sets for s in SYSTEMS]
    notes = [f"{SETS[name][0]}: {SETS[name][1]}." for name in sets]
    notes.append(f"{n_memories} memories, {n_given} training questions given; IPM trained in {train_seconds:.0f} s "
                 f"(epochs {cfg.epochs}, {cfg.questions_per_memory} generated questions per memory, "
                 f"LoRA in the top {manifest['metrics'].get('trained_layers')} layers).")
    notes.append(f"The default decoding is {cfg.decoding}; both are scored on the same index. IPM recall is of "
                 "its ranking, also when it abstains; its answer and abstention rates are columns of their own "
                 "(answered right is `ipm eval`'s recall@1, an abstention being a miss).")
    common.write_results("reference", data, rows, args.out_dir, args.json,
                         title="IPM 2.0 reference store: training vs held-out questions", notes=notes)
    return data


if __name__ == "__main__":
    main()
