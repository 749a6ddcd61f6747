"""Which training questions make the adapter find the right memory? One LoCoMo run per mix.

    python benchmarks/question_mix.py                       # conv-26 observations, every mix
    python benchmarks/question_mix.py --mixes no-wh,all --conversations 2
    python benchmarks/question_mix.py --mixes no-wh,wh --collate        # re-tabulate kept results

Each mix trains a fresh index on the same memories with only those sources of training inputs
(every mix also trains on the memory's own text), then benchmarks/locomo.py scores it on the
held-out LoCoMo questions: the adapter alone over every ID (pure decoding), the adapter alone
among the hybrid candidates, and hybrid decoding with the configured fusion weights, with BM25
and dense retrieval in the same run. Writes results/question-mix.{json,md,png}; each mix's
full LoCoMo output goes to results/question-mix/<mix>/.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common
import locomo

# name -> (question_kinds, question_source). "all" is the ipm.Config default.
MIXES = {
    "text": ("", "builtin"),  # the memory's own text only
    "spans": ("spans", "builtin"),  # doc-as-query: sentences and word spans
    "keywords": ("keywords", "builtin"),
    "templates": ("templates", "builtin"),
    "wh": ("wh", "builtin"),
    "llm": ("", "llm"),  # base-model-written questions, few-shot, filtered
    "no-wh": ("templates,keywords,spans,id", "builtin"),  # the default before the wh kind
    "all": ("templates,wh,keywords,spans,id", "builtin"),
    "all+llm": ("templates,wh,keywords,spans,id", "both"),
}


def adapter_among_candidates(fusion: dict) -> dict | None:
    for r in fusion.get("grid", []):
        if tuple(r["weights"]) == tuple(fusion["adapter_only"]):
            return r["all"]
    return None


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="LoCoMo conversation files (default ../shared/data/locomo/*.json)")
    p.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated, from: {', '.join(MIXES)}")
    p.add_argument("--conversations", type=int, default=1, metavar="N", help="evaluate the first N files (default 1)")
    p.add_argument("--variant", choices=("observations", "turns"), default="observations")
    p.add_argument("--limit-memories", type=int, default=None, metavar="N",
                   help="keep only the first N memories of each conversation (smoke tests)")
    p.add_argument("--out-of-scope", type=int, default=50, metavar="N")
    p.add_argument("--collate", action="store_true",
                   help="train nothing: tabulate the mixes' results already in <out-dir>/question-mix/")
    args = p.parse_args(argv)
    mixes = [m for m in args.mixes.split(",") if m]
    unknown = set(mixes) - set(MIXES)
    if unknown:
        p.error(f"unknown mixes: {', '.join(sorted(unknown))}")
    info = common.run_info(args.seed, common.command(__file__, argv))
    runs, rows = {}, []
    for name in mixes:
        kinds, source = MIXES[name]
        sub = [str(x) for x in args.paths] + ["--variant", args.variant, "--conversations", str(args.conversations),
                                               "--seed", str(args.seed), "--out-of-scope", str(args.out_of_scope), "--out-dir", str(Path(args.out_dir) / "question-mix" / name)]
        sub += ["--question-kinds", kinds, "--question-source", source]
        if args.limit_memories:
            sub += ["--limit-memories", str(args.limit_memories)]
        for flag in ("base_model", "epochs", "questions_per_memory", "lora_layers", "id_scheme"):
            value = getattr(args, flag)
            if value is not None:
                sub += ["--" + flag.replace("_", "-"), str(value)]
        kept = Path(args.out_dir) / "question-mix" / name / f"locomo-{args.variant}.json"
        if args.collate:
            if not kept.is_file():
                p.error(f"--collate: no results for mix {name} ({kept})")
            d = json.loads(kept.read_text(encoding="utf-8"))
        else:
            print(f"== mix {name}: locomo.py {' '.join(sub)}", flush=True)
            with tempfile.TemporaryDirectory(prefix="ipm-mix-") as tmp:
                d = locomo.main(sub + ["--home", str(Path(tmp) / "home")])
        o = d["overall"]
        examples = sum(r.get("train_examples", 0) for r in d["per_conversation"].values())
        among = adapter_among_candidates(d.get("fusion_sweep") or {})
        runs[name] = {"question_kinds": d["config"]["question_kinds"], "question_source": d["config"]["question_source"],
                      "train_examples": examples, "train_seconds": sum(d["train_seconds"].values()),
                      "overall": o, "adapter_among_candidates": among,
                      "commit": d["run"]["git_commit"], "command": d["run"]["command"]}
        rows.append(common.row(f"ipm hybrid, mix {name}", o["ipm-hybrid"],
                               **{"kinds": "+".join(d["config"]["question_kinds"]) or "(text only)",
                                  "source": d["config"]["question_source"], "train examples": examples,
                                  "train s": round(runs[name]["train_seconds"]),
                                  "pure recall@1 %": o["ipm-pure"]["recall@1"], "pure recall@5 %": o["ipm-pure"]["recall@5"],
                                  "adapter among candidates recall@1 %": among["recall@1"] if among else None}))
    base = runs[mixes[0]]["overall"]
    data = {"benchmark": "question-mix", "seed": args.seed, "variant": args.variant,
            "conversations": args.conversations, "mixes": runs,
            "baselines": {s: base[s] for s in ("bm25", "dense") if s in base}, "run": info}
    bl = data["baselines"]
    notes = [(f"LoCoMo {args.variant}, first {args.conversations} conversation(s); held-out questions of "
              f"categories 1-4. Recall in %. Baselines on the same questions (rows below)."),
             ("recall@k and MRR: hybrid decoding (the default) with the configured fusion weights; "
              "pure = the adapter alone over every ID; adapter among candidates = the adapter alone ranking hybrid "
              "decoding's BM25 + dense candidates."),
             "Every mix also trains on the memory's own text; 'all' is ipm.Config's default.",
             "HEAD when each mix started (all ran in one process started at the first): " + ", ".join(sorted({r["commit"][:7] for r in runs.values()})) + "."]
    rows += [common.row(name, metrics) for name, metrics in bl.items()]
    common.write_results("question-mix", data, rows, args.out_dir, args.json, notes=notes,
                         title=f"Question mix ablation (LoCoMo {args.variant})")
    return data


if __name__ == "__main__":
    main()
