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


def variant_parser(description: str, choices: dict, what: str):
    """The flags of a one-LoCoMo-run-per-variant ablation (question_mix.py, recipe.py)."""
    p = common.parser(description)
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="LoCoMo conversation files (default ../shared/data/locomo/*.json)")
    p.add_argument(f"--{what}", default=",".join(choices), help=f"comma-separated, from: {', '.join(choices)}")
    p.add_argument("--conversations", type=int, default=1, metavar="N", help="evaluate the first N files (default 1)")
    p.add_argument("--variant", choices=("observations", "turns"), default="observations")
    p.add_argument("--limit-memories", type=int, default=None, metavar="N",
                   help="keep only the first N memories of each conversation (smoke tests)")
    p.add_argument("--out-of-scope", type=int, default=50, metavar="N")
    p.add_argument("--collate", action="store_true",
                   help=f"train nothing: tabulate the {what}' results already in <out-dir>/<benchmark>/")
    return p


def run_variants(p, args, command: list[str], bench: str, variants: dict[str, list[str]], describe, title: str,
                 notes: list[str]) -> dict:
    """Train and score one fresh index per variant (extra benchmarks/locomo.py flags) on the
    same conversations; tabulate them with the baselines of the first. `describe(config)` gives
    a variant's own table columns. Each variant's full LoCoMo output goes to <out-dir>/<bench>/<name>/."""
    info = common.run_info(args.seed, command)
    runs, rows = {}, []
    for name, flags in variants.items():
        sub = [str(x) for x in args.paths] + ["--variant", args.variant, "--conversations", str(args.conversations),
                                               "--seed", str(args.seed), "--out-of-scope", str(args.out_of_scope),
                                               "--out-dir", str(Path(args.out_dir) / bench / name)]
        if args.limit_memories:
            sub += ["--limit-memories", str(args.limit_memories)]
        for flag in ("base_model", "epochs", "questions_per_memory", "lora_layers", "id_scheme"):
            value = getattr(args, flag)
            if value is not None:
                sub += ["--" + flag.replace("_", "-"), str(value)]
        for pair in args.overrides:
            sub += ["--set", pair]
        sub += flags  # last, so the variant's own setting wins
        kept = Path(args.out_dir) / bench / name / f"locomo-{args.variant}.json"
        if args.collate:
            if not kept.is_file():
                p.error(f"--collate: no results for {name} ({kept})")
            d = json.loads(kept.read_text(encoding="utf-8"))
        else:
            print(f"== {name}: locomo.py {' '.join(sub)}", flush=True)
            with tempfile.TemporaryDirectory(prefix=f"ipm-{bench}-") as tmp:
                d = locomo.main(sub + ["--home", str(Path(tmp) / "home")])
        o = d["overall"]
        examples = sum(r.get("train_examples", 0) for r in d["per_conversation"].values())
        among = adapter_among_candidates(d.get("fusion_sweep") or {})
        runs[name] = {"flags": flags, "config": d["config"], "train_examples": examples,
                      "train_seconds": sum(d["train_seconds"].values()), "overall": o,
                      "adapter_among_candidates": among, "commit": d["run"]["git_commit"],
                      "cuda": d["run"]["machine"].get("cuda"), "command": d["run"]["command"]}
        rows.append(common.row(f"ipm hybrid, {name}", o["ipm-hybrid"],
                               **describe(d["config"]), **{"machine": runs[name]["cuda"] or "CPU",
                               "train examples": examples,
                               "train s": round(runs[name]["train_seconds"]),
                               "pure recall@1 %": o["ipm-pure"]["recall@1"], "pure recall@5 %": o["ipm-pure"]["recall@5"],
                               "adapter among candidates recall@1 %": among["recall@1"] if among else None}))
    base = runs[next(iter(variants))]["overall"]
    data = {"benchmark": bench, "seed": args.seed, "variant": args.variant,
            "conversations": args.conversations, "variants": runs,
            "baselines": {s: base[s] for s in ("bm25", "dense") if s in base}, "run": info}
    notes = [(f"LoCoMo {args.variant}, first {args.conversations} conversation(s); held-out questions of "
              f"categories 1-4. Recall in %. Baselines on the same questions (rows below)."),
             ("recall@k and MRR: hybrid decoding (the default) with the configured fusion weights; "
              "pure = the adapter alone over every ID; adapter among candidates = the adapter alone ranking hybrid "
              "decoding's BM25 + dense candidates."), *notes,
             "HEAD when each variant started: " + ", ".join(sorted({(r["commit"] or "unknown")[:7] for r in runs.values()})) + "."]
    rows += [common.row(name, metrics) for name, metrics in data["baselines"].items()]
    common.write_results(bench, data, rows, args.out_dir, args.json, notes=notes, title=title)
    return data


def main(argv: list[str] | None = None) -> dict:
    p = variant_parser(__doc__.split("\n\n")[0], MIXES, "mixes")
    args = p.parse_args(argv)
    mixes = [m for m in args.mixes.split(",") if m]
    unknown = set(mixes) - set(MIXES)
    if unknown:
        p.error(f"unknown mixes: {', '.join(sorted(unknown))}")
    variants = {m: ["--question-kinds", MIXES[m][0], "--question-source", MIXES[m][1]] for m in mixes}
    describe = lambda c: {"kinds": "+".join(c["question_kinds"]) or "(text only)", "source": c["question_source"]}  # noqa: E731
    return run_variants(p, args, common.command(__file__, argv), "question-mix", variants, describe, f"Question mix ablation (LoCoMo {args.variant})",
                        ["Every mix also trains on the memory's own text; 'all' is ipm.Config's default."])


if __name__ == "__main__":
    main()
