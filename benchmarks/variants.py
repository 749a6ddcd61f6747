"""One LoCoMo run per variant, a variant being a named set of ipm.Config overrides: the shared
loop of question_mix.py (training inputs) and recipe.py (epochs, learning rate, rank, layers).

Each variant trains a fresh index on the same memories; benchmarks/locomo.py scores it on the
held-out LoCoMo questions (the adapter alone over every ID, the adapter alone among the hybrid
candidates, hybrid decoding), with BM25 and dense retrieval in the same run. The summary
(<out-dir>/<bench>.{json,md,png}) is rewritten after every variant, so a run cut short keeps
what it finished; each variant's full LoCoMo output goes to <out-dir>/<bench>/<name>/.
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import locomo


def adapter_among_candidates(fusion: dict) -> dict | None:
    for r in fusion.get("grid", []):
        if tuple(r["weights"]) == tuple(fusion["adapter_only"]):
            return r["all"]
    return None


def main(argv: list[str] | None, *, script: str, doc: str, bench: str, variants: dict[str, dict], what: str,
         describe, title: str, notes: list[str]) -> dict:
    """Parse the flags, then train and score each chosen variant (`--<what> a,b`; default all)."""
    p = common.parser(doc.split("\n\n")[0])
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="LoCoMo conversation files (default ../shared/data/locomo/*.json)")
    p.add_argument(f"--{what}", default=",".join(variants), help=f"comma-separated, from: {', '.join(variants)}")
    p.add_argument("--conversations", type=int, default=1, metavar="N", help="evaluate the first N files (default 1)")
    p.add_argument("--variant", choices=("observations", "turns"), default="observations")
    p.add_argument("--limit-memories", type=int, default=None, metavar="N",
                   help="keep only the first N memories of each conversation (smoke tests)")
    p.add_argument("--out-of-scope", type=int, default=50, metavar="N")
    p.add_argument("--collate", action="store_true",
                   help=f"train nothing: tabulate the {what}' results already in <out-dir>/{bench}/")
    p.add_argument("--reuse", action="store_true",
                   help=f"pass the kept results in <out-dir>/{bench}/<name>/ of each of the {what} to "
                        "locomo.py --reuse: conversations they ran with this configuration are not trained again "
                        "(resume a cut-short run; with other fusion settings, hybrid is ranked again from the kept scores)")
    args = p.parse_args(argv)
    names = [n for n in getattr(args, what).split(",") if n]
    if not names:
        p.error(f"--{what}: name at least one")
    unknown = set(names) - set(variants)
    if unknown:
        p.error(f"unknown {what}: {', '.join(sorted(unknown))}")
    common.config(args)  # a bad override fails here, before any training
    info = common.run_info(args.seed, common.command(script, argv))
    runs, rows = {}, []
    data: dict = {}
    for name in names:
        # the variant's overrides come last, so they win over the same field given on the command line
        sub = [str(x) for x in args.paths] + ["--variant", args.variant, "--conversations", str(args.conversations),
                                               "--seed", str(args.seed), "--out-of-scope", str(args.out_of_scope),
                                               "--out-dir", str(Path(args.out_dir) / bench / name)]
        if args.limit_memories:
            sub += ["--limit-memories", str(args.limit_memories)]
        sub += common.config_argv(args)
        sub += [a for key, value in variants[name].items() for a in ("--set", f"{key}={json.dumps(value)}")]
        kept = Path(args.out_dir) / bench / name / f"locomo-{args.variant}.json"
        if args.reuse and kept.is_file():
            sub += ["--reuse", str(kept)]
        if args.collate:
            if not kept.is_file():
                p.error(f"--collate: no results for {name} ({kept})")
            d = json.loads(kept.read_text(encoding="utf-8"))
            if d.get("planned", d["conversations"]) != d["conversations"]:
                p.error(f"--collate: {name}'s run was cut short ({len(d['conversations'])} of "
                        f"{len(d['planned'])} conversations in {kept}); run it again")
        else:
            print(f"== {name}: locomo.py {' '.join(sub)}", flush=True)
            with common.home(Path(args.home) / name if args.home is not None else None) as home:
                d = locomo.main(sub + ["--home", str(home)])
        o = d["overall"]
        examples = sum(r.get("train_examples", 0) for r in d["per_conversation"].values())
        among = adapter_among_candidates(d.get("fusion_sweep") or {})
        # Where each conversation was trained: a reused one keeps its first run's commit and
        # machine (origins recorded before the machine was are "unrecorded").
        here = {"commit": d["run"]["git_commit"], "cuda": d["run"]["machine"].get("cuda")}
        trained = [{"cuda": "unrecorded", **r["reused_from"]} if r.get("reused_from") else here
                   for r in d["per_conversation"].values()]
        machines = sorted({t["cuda"] or "CPU" for t in trained})
        runs[name] = {"overrides": variants[name], "config": d["config"], "train_examples": examples,
                      "train_seconds": sum(d["train_seconds"].values()), "overall": o,
                      "adapter_among_candidates": among,
                      "commit": ",".join(sorted({(t["commit"] or "unknown")[:7] for t in trained})),
                      "cuda": None if machines == ["CPU"] else ", ".join(machines),
                      "command": d["run"]["command"]}
        rows.append(common.row(f"ipm hybrid, {name}", o["ipm-hybrid"], **describe(d["config"]), **{
            "machine": runs[name]["cuda"] or "CPU", "train examples": examples,
            "train s": round(runs[name]["train_seconds"]),
            "pure recall@1 %": o["ipm-pure"]["recall@1"], "pure recall@5 %": o["ipm-pure"]["recall@5"],
            "adapter among candidates recall@1 %": among["recall@1"] if among else None}))
        # the summary so far, rewritten after every variant
        first = runs[names[0]]["overall"]
        data = {"benchmark": bench, "seed": args.seed, "variant": args.variant, "conversations": args.conversations,
                "variants": runs, "baselines": {s: first[s] for s in ("bm25", "dense") if s in first}, "run": info}
        all_notes = [(f"LoCoMo {args.variant}, first {args.conversations} conversation(s); held-out questions of "
                      f"categories 1-4. Recall in %. Baselines (last rows) from the first variant's run."),
                     ("recall@k and MRR: hybrid decoding (the default) with the configured fusion weights; "
                      "pure = the adapter alone over every ID; adapter among candidates = the adapter alone ranking "
                      "hybrid decoding's BM25 + dense candidates."), *notes,
                     "Commit each variant was trained at (a reused conversation keeps its first run's): " + ", ".join(
                         f"{n} {r['commit']}" for n, r in runs.items()) + "."]
        table = rows + [common.row(n, m) for n, m in data["baselines"].items()]
        common.write_results(bench, data, table, args.out_dir, args.json, notes=all_notes, title=title)
    return data
