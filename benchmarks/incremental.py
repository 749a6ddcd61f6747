"""Incremental training and forgetting: does folding new memories into the index cost the old ones?

    python benchmarks/incremental.py [--json OUT]

The demo set is split: the first half of its memories is indexed from scratch, then 10%, 50%
and 100% more memories (of that first half's count) are added, each time from a copy of that
first index, and folded in with an incremental `train()` (continuing from the adapter, with
replayed questions of the old memories). Held-out recall on the old memories' questions is
measured before and after, with pure decoding (the adapter alone: that is where forgetting
would show) and hybrid decoding, with the new memories' recall and the time taken. At 100%,
a full retrain from scratch on the same memories gives the time and recall to compare with.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import common

FRACTIONS = (0.1, 0.5, 1.0)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--memories", type=Path, default=common.REPO / "examples" / "demo" / "memories.jsonl")
    p.add_argument("--questions", type=Path, default=common.REPO / "examples" / "demo" / "questions.json")
    p.add_argument("--old", type=int, default=50, help="memories indexed first (default %(default)s)")
    args = p.parse_args(argv)

    import ipm
    from ipm.evaluate import Question, load_questions

    info = common.run_info(args.seed, common.command(__file__, argv))
    common.seed_everything(args.seed)
    cfg = common.config(args)
    records = [json.loads(line) for line in args.memories.read_text(encoding="utf-8").splitlines() if line.strip()]
    old, pool = records[: args.old], records[args.old:]
    need = round(max(FRACTIONS) * len(old))
    if len(pool) < need:
        raise SystemExit(f"{args.memories} has {len(records)} memories: {args.old} old + {need} new are needed")
    questions = [q for q in load_questions(args.questions) if q.gold is not None]

    def about(ids: set[str]) -> list[Question]:
        return [q for q in questions if q.gold <= ids]

    old_ids = {r["id"] for r in old}
    runs: dict[str, dict] = {}
    with common.home(args.home) as home, common.Bars() as bars:
        base_home = home / "base"
        mem = ipm.open(base_home, config=cfg)
        mem.import_records(old)
        t0 = time.perf_counter()
        mem.train(progress=bars.train(f"{len(old)} old, from scratch"))
        base_seconds = time.perf_counter() - t0
        before = recall(mem, about(old_ids), bars, "before")
        mem.store.close()
        for f in FRACTIONS:
            new = pool[: round(f * len(old))]
            new_ids = {r["id"] for r in new}
            h = home / f"plus{int(f * 100)}"
            shutil.copytree(base_home, h)
            mem = ipm.open(h, config=cfg)
            mem.import_records(new)
            t0 = time.perf_counter()
            manifest = mem.train(progress=bars.train(f"+{len(new)} incremental"))
            run = {"new_memories": len(new), "incremental": manifest["metrics"]["incremental"],
                   "seconds": round(time.perf_counter() - t0, 2),
                   "old": recall(mem, about(old_ids), bars, f"+{len(new)} old"),
                   "new": recall(mem, about(new_ids), bars, f"+{len(new)} new")}
            if f == max(FRACTIONS):
                t0 = time.perf_counter()
                mem.train(full=True, progress=bars.train(f"{len(old) + len(new)} from scratch"))
                run["full_retrain"] = {"seconds": round(time.perf_counter() - t0, 2),
                                       "old": recall(mem, about(old_ids), bars, "full old"),
                                       "new": recall(mem, about(new_ids), bars, "full new")}
            runs[f"+{int(f * 100)}%"] = run
            mem.store.close()

    data = {"benchmark": "incremental", "seed": args.seed, "old_memories": len(old),
            "old_questions": len(about(old_ids)), "base_train_seconds": round(base_seconds, 2),
            "before": before, "runs": runs, "config": cfg.to_dict(), "run": info}
    rows = []
    for name, r in runs.items():
        for mode in common.DECODINGS:
            rows.append(_row(f"{name} incremental, {mode}", r, mode, before, r["seconds"]))
        if "full_retrain" in r:
            for mode in common.DECODINGS:
                rows.append(_row(f"{name} full retrain, {mode}", r["full_retrain"], mode, before,
                                 r["full_retrain"]["seconds"]))
    notes = [f"{len(old)} old memories indexed from scratch in {base_seconds:.0f} s; {len(about(old_ids))} held-out "
             f"questions about them. Before any addition, old-memory recall@1: "
             + ", ".join(f"{mode} {100 * before[mode]['recall@1']:.1f}%" for mode in common.DECODINGS) + ".",
             "Each addition starts from a copy of that first index. 'drop' is old-memory recall@1 before minus after, "
             "in points; 'recall@1 new memories' is on the added memories' held-out questions.",
             f"Incremental training replays {cfg.replay_ratio:g} questions of old memories per new question."]
    common.write_results("incremental", data, rows, args.out_dir, args.json, notes=notes,
                         title="Incremental training: recall of old memories after adding new ones")
    return data


def recall(mem, questions, bars, label: str) -> dict:
    """Held-out metrics with each decoding."""
    report = common.evaluate_systems(mem, questions, "default", bars, label, baselines=())
    return {mode: report[f"ipm-{mode}"] for mode in common.DECODINGS}


def _row(system: str, r: dict, mode: str, before: dict, seconds: float) -> dict:
    old = r["old"][mode]
    return common.row(system, old, **{"drop (points)": round(100 * (before[mode]["recall@1"] - old["recall@1"]), 1),
                                      "recall@1 new memories": r["new"][mode]["recall@1"], "train seconds": seconds})


if __name__ == "__main__":
    main()
