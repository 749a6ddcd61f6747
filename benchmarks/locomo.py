"""Retrieval recall on LoCoMo: IPM against BM25 and dense retrieval on the same memories.

Each conversation is its own ipm namespace. Its memories are either the observation facts
distilled from the dialog (--variant observations) or the dialog turns themselves
(--variant turns). IPM trains on questions generated from those memories only; the LoCoMo
`qa` questions (categories 1-4) are the test. A question is a hit@k when one of its top-k
memories comes from one of its evidence turns. Questions from the other conversations, which
no memory here answers, test whether IPM refuses what it does not know.

A turn memory is "{speaker} ({session date}): {text} [image: {caption}]". The shared README's
turn figures were measured on "{speaker}: {text}", which scores BM25 and dense a little lower.

IPM is scored with each decoding (`--decodings`) on the same trained index. For hybrid
decoding, every candidate's three scores (adapter, dense, BM25) are kept, and a grid of fusion
weights is scored on them: weights are chosen on the `--tune-on` conversations only and
reported on all, so the choice of a default uses no question of the others.

    python benchmarks/locomo.py --variant observations   # all five shared conversations
    python benchmarks/locomo.py --variant turns --baselines-only

The results are rewritten after each conversation, so a run cut short keeps what it finished.
`--reuse` takes a conversation's result from earlier runs instead of training it again, when
they ran it with the same variant, configuration, seed, ID source (`--ids`), memory limit and
decodings: a long run can be made in pieces (or resumed) and still be scored and fused as one.
A reused run whose fusion settings (query-time only) differ from this run's has its hybrid
ranking computed again from its kept candidate scores with this run's settings: the same
ranking hybrid decoding would return with them, since the adapter's scores do not depend on
them. Its abstention and out-of-scope figures, which depend on the threshold calibrated with
the old settings, are left out.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time
from pathlib import Path

import common

CATEGORIES = {"1": "multi-hop", "2": "temporal", "3": "open-domain", "4": "single-hop"}
DIA_ID = re.compile(r"D\s*:?\s*(\d+)\s*:\s*(\d+)")
BASELINES = ("bm25", "dense")
METRICS = ("recall@1", "recall@5", "recall@10", "mrr")
ANSWER_KEYS = ("answered_correct", "abstained", "wrong_answer_rate", "out_of_scope")  # hang on the threshold
# Fusion weights scored on the kept candidate scores: (adapter, dense, bm25), see ipm.search.fuse;
# the BM25 floor stays the configured one.
GRID = [(a, d, b) for a in (0.0, 0.5, 1.0) for d in (0.0, 5.0, 10.0, 20.0, 40.0)
        for b in (0.0, 1.0, 2.0, 4.0, 8.0, 16.0) if (a, d, b) != (0.0, 0.0, 0.0)]


# -- data --------------------------------------------------------------------------------
def dia_ids(raw) -> set[str]:
    """Normalised turn IDs ("D3:12") from an evidence or observation entry, which in the data
    is sometimes a list, or malformed: "D8:6; D9:17", "D:11:26", " D2:5", or just "D"."""
    if isinstance(raw, (list, tuple)):
        return set().union(*(dia_ids(r) for r in raw)) if raw else set()
    return {f"D{a}:{b}" for a, b in DIA_ID.findall(str(raw))}


def sessions(conv: dict) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in conv if re.fullmatch(r"session_\d+", k))


def memories(conv: dict, variant: str) -> list[tuple[str, set[str]]]:
    """(memory text, the turn IDs it comes from) in conversation order."""
    out = []
    for n in sessions(conv):
        if variant == "turns":
            date = conv.get(f"session_{n}_date_time", "")
            for t in conv[f"session_{n}"]:
                text = f"{t['speaker']} ({date}): {t['text']}"
                if t.get("blip_caption"):
                    text += f" [image: {t['blip_caption']}]"
                out.append((text, dia_ids(t["dia_id"])))
        else:
            for facts in conv.get(f"session_{n}_observation", {}).values():
                out.extend((fact, dia_ids(ids)) for fact, ids in facts)
    return out


def qa_items(conv: dict) -> list[dict]:
    """The qa items of categories 1-4 (5 is adversarial: no answer in the conversation)."""
    return [q for q in conv["qa"] if str(q.get("category")) in CATEGORIES]


def scored_questions(conv: dict, turns_of: dict[str, set[str]]) -> tuple[list, int, int]:
    """The qa questions (categories 1-4) with their gold memories, those made from one of their
    evidence turns (`turns_of`: memory ID -> its turn IDs); and how many were left out for
    naming no evidence turn, and for having no memory made from their evidence turns."""
    from ipm.evaluate import Question

    questions, no_evidence, skipped = [], 0, 0
    for q in qa_items(conv):
        evidence = dia_ids(q["evidence"])
        gold = frozenset(mid for mid, ids in turns_of.items() if ids & evidence)
        if gold:
            questions.append(Question(q["question"], gold, str(q["category"])))
        elif not evidence:  # the data names no evidence turn: unscorable in any variant
            no_evidence += 1
        else:  # no memory comes from its evidence turns (e.g. a turn no observation was made of)
            skipped += 1
    return questions, no_evidence, skipped


# -- aggregation -------------------------------------------------------------------------
def micro(parts: list[dict]) -> dict:
    """Combine per-conversation metric dicts into one over all their questions. Each rate is a
    mean over that conversation's n questions, so its n-weighted mean is the exact micro
    average; IPM's latency percentiles and invalid-ID rate (a share of the IDs returned) are
    not such means, and their n-weighted mean is only a summary."""
    parts = [p for p in parts if p.get("n")]
    n = sum(p["n"] for p in parts)
    out = {"n": n}
    for key in dict.fromkeys(k for p in parts for k, v in p.items() if isinstance(v, (int, float)) and k != "n"):
        having = [p for p in parts if key in p]  # a metric added since a reused run is not diluted
        m = sum(p["n"] for p in having)
        out[key] = sum(p[key] * p["n"] for p in having) / m if m else 0.0
    cats = sorted({c for p in parts for c in p.get("by_category", {})})
    if cats:
        out["by_category"] = {c: micro([p["by_category"][c] for p in parts if c in p.get("by_category", {})])
                              for c in cats}
    oos = [p["out_of_scope"] for p in parts if "out_of_scope" in p]
    if oos:
        m = sum(o["n"] for o in oos)
        out["out_of_scope"] = {"n": m, "refused": sum(o["refused"] * o["n"] for o in oos) / m}
    return out


# -- ID-scheme comparison ----------------------------------------------------------------
def cluster_ids(texts: list[str], seed: int) -> list[str]:
    """Topic-prefixed IDs (ipm.ids.topic_prefixed_ids) over k-means clusters (k = √n) of the
    texts' MiniLM embeddings: the third ID scheme of the comparison, minted here because the
    engine's store mints one memory at a time, without the others' embeddings."""
    import math

    from ipm.ids import topic_prefixed_ids
    from ipm.retrieve import load_dense_encoder
    from sklearn.cluster import KMeans

    k = max(2, round(math.sqrt(len(texts))))
    emb = load_dense_encoder().encode(texts).cpu().numpy()
    return topic_prefixed_ids(texts, KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(emb).tolist())


# -- one conversation --------------------------------------------------------------------
def run_conversation(mem, conv_id: str, conv: dict, others: list[dict], args, bars) -> dict:
    """Load one conversation's memories into namespace `conv_id`, train, evaluate every system."""
    from ipm.evaluate import Question, evaluate_baseline
    from ipm.store import NewMemory

    mems = memories(conv, args.variant)[: args.limit_memories]
    if mem.store.count(conv_id):
        raise SystemExit(f"namespace {conv_id!r} already has memories; use a fresh --home")
    given = cluster_ids([text for text, _ in mems], args.seed) if args.ids == "cluster" else [None] * len(mems)
    added = mem.store.add_many(conv_id, [NewMemory(text, mid) for (text, _), mid in zip(mems, given)], source="import")
    questions, no_evidence, skipped = scored_questions(conv, {m.id: ids for m, (_, ids) in zip(added, mems)})
    # Out of scope: questions about the other conversations (their people and events).
    pool = [q["question"] for other in others for q in qa_items(other)]
    rng = random.Random(f"{args.seed}:{conv_id}")
    oos = [Question(q, None) for q in rng.sample(pool, min(args.out_of_scope, len(pool)))]
    result = {"memories": len(added), "questions": len(questions), "skipped_no_gold": skipped,
              "skipped_no_evidence": no_evidence, "out_of_scope_questions": len(oos)}
    if args.baselines_only:
        ids, texts = [m.id for m in added], [m.text for m in added]
        for name in BASELINES:
            result[name] = evaluate_baseline(name, ids, texts, questions)
        return result
    t0 = time.perf_counter()
    manifest = mem.train(user=conv_id, progress=bars.train(conv_id))
    result["train_seconds"] = round(time.perf_counter() - t0, 2)
    result["train_examples"] = manifest["metrics"].get("examples")
    result["calibration"] = manifest["metrics"]["calibration"]
    result["phase_seconds"] = manifest["metrics"].get("phase_seconds")
    # Hybrid ranks every candidate anyway: asking for all of them keeps their scores for the sweep.
    answers: list = []
    result.update(common.evaluate_systems(mem, questions + oos, conv_id, bars, conv_id, args.decodings,
                                          () if args.no_baselines else BASELINES, added, answers))
    if answers:
        result["candidate_scores"] = common.kept_scores(answers)
    return result


# -- fusion sweep ------------------------------------------------------------------------
def fused_rankings(items: list[dict], weights: tuple[float, float, float], floor: float,
                   noise: float = 0.0) -> list[list[str]]:
    """Each item's candidates ranked by hybrid decoding's fusion with `weights`, BM25 `floor` and `noise`."""
    from ipm.search import Signals, fuse

    a, d, b = weights
    return [[mid for mid, _ in fuse({mid: Signals(*v) for mid, v in it["candidates"].items()}, d, b, a, floor, noise)]
            for it in items]


def fused_metrics(items: list[dict], weights: tuple[float, float, float], floor: float, noise: float = 0.0) -> dict:
    """Recall and MRR of the candidates re-ranked with `weights`, over the kept candidate scores."""
    from ipm.evaluate import ranking_metrics

    return ranking_metrics(fused_rankings(items, weights, floor, noise), [frozenset(it["gold"]) for it in items])


def rescored_hybrid(old: dict, items: list[dict], cfg) -> dict:
    """A reused run's hybrid metrics with this run's fusion settings, from its kept candidate
    scores: recall, MRR and per category computed again; invalid IDs (none can be: the
    candidates are store IDs) and latency (fusion is a few additions) kept; abstention and
    out-of-scope figures dropped, as they depend on the old calibration."""
    from ipm.evaluate import Question, by_category, ranking_metrics

    weights = (cfg.fusion_adapter, cfg.fusion_dense, cfg.fusion_bm25)
    rankings = fused_rankings(items, weights, cfg.fusion_bm25_floor, cfg.fusion_bm25_noise)
    questions = [Question("", frozenset(it["gold"]), it.get("category")) for it in items]
    out = {**ranking_metrics(rankings, [q.gold for q in questions]),
           **{k: old[k] for k in ("invalid_id_rate", "latency_ms_p50", "latency_ms_p95") if k in old}}
    cats = by_category(questions, rankings)
    if cats:
        out["by_category"] = cats
    return out


def raw_bm25_items(conv: dict, variant: str, limit: int | None, items: list[dict],
                   bm25s_version: str | None = None) -> list[dict]:
    """Kept candidate scores from before BM25 scores were kept raw (each was divided by the
    question's best BM25 score): multiplied back by that best score, computed again with the
    same BM25 over the same memory texts and questions."""
    from importlib.metadata import version

    from ipm.retrieve import BM25

    if bm25s_version and bm25s_version != version("bm25s"):
        raise SystemExit(f"--reuse: that run's BM25 scores came from bm25s {bm25s_version}, this is "
                         f"{version('bm25s')}: they cannot be recovered; run the conversation again")
    mems = memories(conv, variant)[:limit]
    questions, _, _ = scored_questions(conv, {str(i): ids for i, (_, ids) in enumerate(mems)})
    if len(questions) != len(items) or any(q.category != it.get("category", q.category) for q, it in zip(questions, items)):
        raise SystemExit(f"--reuse: the kept candidate scores ({len(items)}) do not line up with this "
                         f"conversation's {len(questions)} questions; the conversation file changed since that run")
    bm25 = BM25([str(i) for i in range(len(mems))], [text for text, _ in mems])
    out = []
    for q, it in zip(questions, items):
        best = max(bm25.scores(q.question), default=0.0)
        out.append({**it, "candidates": {mid: [lora, cos, bm * best] for mid, (lora, cos, bm) in it["candidates"].items()}})
    return out


def sweep(per_conv: dict, tune_on: list[str], configured: tuple[float, float, float], floor: float,
          noise: float = 0.0) -> dict:
    """Score every GRID weight on the tuning conversations, the others and all; pick on tuning."""
    items = {c: r.get("candidate_scores", []) for c, r in per_conv.items()}
    tune = [it for c in tune_on for it in items.get(c, [])]
    rest = [it for c, its in items.items() if c not in tune_on for it in its]
    every = tune + rest
    if not tune:
        return {}
    rows = []
    for w in dict.fromkeys(GRID + [configured]):
        t = fused_metrics(tune, w, floor, noise)
        rows.append({"weights": w, "tune": t, "rest": fused_metrics(rest, w, floor, noise) if rest else None,
                     "all": fused_metrics(every, w, floor, noise)})
    key = lambda r: (r["tune"]["recall@1"], r["tune"]["mrr"])  # noqa: E731
    best = max((r for r in rows if r["weights"][0] > 0), key=key)  # without the adapter it is not IPM
    best_retrievers = max((r for r in rows if r["weights"][0] == 0), key=key)
    adapter_only = next(r for r in rows if r["weights"] == (1.0, 0.0, 0.0))
    return {"tune_on": tune_on, "grid": rows, "chosen": best["weights"], "configured": configured,
            "bm25_floor": floor, "bm25_noise": noise, "retrievers_only": best_retrievers["weights"], "n_tune": len(tune), "n_rest": len(rest),
            "adapter_only": adapter_only["weights"]}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="LoCoMo conversation files (default ../shared/data/locomo/*.json)")
    p.add_argument("--variant", choices=("observations", "turns"), default="observations",
                   help="memories: observation facts or dialog turns (default %(default)s)")
    p.add_argument("--conversations", type=int, default=None, metavar="N",
                   help="evaluate only the first N files; the others still give out-of-scope questions")
    p.add_argument("--limit-memories", type=int, default=None, metavar="N",
                   help="keep only the first N memories of each conversation (smoke tests)")
    p.add_argument("--out-of-scope", type=int, default=50, metavar="N",
                   help="out-of-scope questions per conversation, drawn from the other files (default %(default)s)")
    p.add_argument("--baselines-only", action="store_true", help="skip IPM (no training): BM25 and dense only")
    p.add_argument("--no-baselines", action="store_true", help="IPM only (e.g. on a machine without the dense model)")
    p.add_argument("--decodings", default="hybrid,pure",
                   help="IPM decodings to score on each trained index, comma-separated (default %(default)s)")
    p.add_argument("--tune-on", default="conv-26,conv-30,conv-41",
                   help="conversations on which the fusion sweep picks its weights (default %(default)s)")
    p.add_argument("--ids", choices=("engine", "cluster"), default="engine",
                   help="memory IDs: minted by the engine (Config.id_scheme), or topic-cluster-prefixed "
                        "(cluster_ids, for the ID-scheme comparison) (default %(default)s)")
    p.add_argument("--reuse", nargs="+", type=Path, default=[], metavar="RESULTS",
                   help="results JSON of earlier runs of this benchmark: a conversation they ran with the same "
                        "variant, configuration, seed, --ids, memory limit and decodings is taken from them, "
                        "not trained again")
    args = p.parse_args(argv)
    if args.conversations is not None and args.conversations < 1:
        p.error("--conversations takes 1 or more")
    args.decodings = [d for d in args.decodings.split(",") if d]
    if not set(args.decodings) <= {"pure", "hybrid"}:
        p.error("--decodings takes pure and/or hybrid")
    args.paths = args.paths or sorted((common.SHARED / "locomo").glob("*.json"))
    if not args.paths:
        p.error("no LoCoMo files given and none found in ../shared/data/locomo")

    import ipm

    info = common.run_info(args.seed, common.command(__file__, argv))
    common.seed_everything(args.seed)
    cfg = common.config(args)
    convs = {}
    for path in args.paths:
        conv = json.loads(Path(path).read_text(encoding="utf-8"))
        convs[conv.get("sample_id") or Path(path).stem] = conv
    evaluated = list(convs)[: args.conversations]
    ipm_systems = tuple(f"ipm-{d}" for d in args.decodings)
    systems = BASELINES if args.baselines_only else ipm_systems if args.no_baselines else (*ipm_systems, *BASELINES)
    reused = reusable(args.reuse, args, cfg, systems, convs)
    per_conv, data = {}, {}
    with common.home(args.home) as home, common.Bars() as bars:
        mem = ipm.open(home, config=cfg)
        for conv_id in evaluated:
            if conv_id in reused:
                per_conv[conv_id] = reused[conv_id]
                print(f"{conv_id}: reused from {reused[conv_id]['reused_from']['file']}", flush=True)
            else:
                others = [c for cid, c in convs.items() if cid != conv_id]
                per_conv[conv_id] = run_conversation(mem, conv_id, convs[conv_id], others, args, bars)
            data = write(per_conv, evaluated, systems, args, cfg, info)
        mem.store.close()
    return data


def reusable(paths: list[Path], args, cfg, systems: tuple[str, ...], convs: dict) -> dict:
    """Per-conversation results of earlier runs that this run would reproduce: same variant,
    configuration (fusion settings aside), seed, IDs, memory limit and systems (the first file
    listed wins). Their candidate scores come from the .json.gz written beside each file; where
    they are missing, the conversation is run again. Where the fusion settings differ, the
    hybrid figures are computed again from those scores (see the module docstring)."""
    from ipm.engine import FUSION_OPTIONS as FUSION  # query-time only
    from ipm.engine import _bearing
    from ipm.model import LEGACY_PROMPT, PROMPT

    want = _bearing(json.loads(json.dumps(cfg.to_dict())))
    out: dict = {}
    for path in paths:
        try:
            old = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--reuse {path}: cannot read it as a results file ({e})")
        if old.get("benchmark", "").split("-baselines")[0] != f"locomo-{args.variant}":
            raise SystemExit(f"--reuse {path}: it is not a LoCoMo {args.variant} result")
        had = _bearing(common.run_config(old.get("config", {})))
        free = {*FUSION, "max_k"}  # max_k only caps an ask's k (10 in results before it did, unused then)
        same = ({k: v for k, v in had.items() if k not in free} == {k: v for k, v in want.items() if k not in free},
                old.get("seed") == args.seed, old.get("ids", "engine") == args.ids,
                old.get("limit_memories") == args.limit_memories,
                old.get("run", {}).get("prompt", LEGACY_PROMPT) == PROMPT)
        if not all(same):
            print(f"--reuse {path}: not reused, it ran with another configuration, seed, IDs, memory limit or prompt",
                  flush=True)
            continue
        refuse = any(had[k] != want[k] for k in FUSION)
        scores_file = Path(path).with_name(f"{old['benchmark']}-candidates.json.gz")
        scores = {}
        if scores_file.exists():
            with gzip.open(scores_file, "rt", encoding="utf-8") as f:
                scores = json.load(f)
        for conv_id, result in old.get("per_conversation", {}).items():
            if conv_id in out or not set(systems) <= set(result) or conv_id not in convs:
                continue  # (a conversation not in this run: its scores may need the conversation)
            if "ipm-hybrid" in systems and conv_id not in scores:
                print(f"--reuse {path}: {conv_id} not reused, its candidate scores are not in {scores_file} "
                      "(keep that file beside the results)", flush=True)
                continue
            run = old.get("run", {})
            kept = scores.get(conv_id, []) if "ipm-hybrid" in result else []
            if kept and old.get("bm25_scores") != "raw":
                kept = raw_bm25_items(convs[conv_id], args.variant, args.limit_memories, kept,
                                      run.get("versions", {}).get("bm25s"))
            # Where the figures were made: a result reused again keeps its first origin (the
            # run that trained it, and the fusion its calibration saw).
            origin = result.get("reused_from") or {"file": str(path), "commit": run.get("git_commit"), "utc": run.get("utc"),
                                                    "cuda": run.get("machine", {}).get("cuda")}
            result = {**result, "candidate_scores": kept, "reused_from": dict(origin)}
            if set(systems) & {"ipm-hybrid", "ipm-pure"} and "expansion_folds" not in result.get(
                    "calibration", {}).get("hybrid", {}):
                # Calibrated before hybrid calibration was cross-fitted (and sampled): its
                # thresholds are not the ones this code would pick, so neither are its answers.
                for system in ("ipm-hybrid", "ipm-pure"):
                    if system in result:
                        result[system] = {k: v for k, v in result[system].items() if k not in ANSWER_KEYS}
                result["reused_from"]["calibration"] = "before cross-fitting: abstention figures left out"
                print(f"--reuse {path}: {conv_id} was calibrated before cross-fitting: its abstention figures are "
                      "left out", flush=True)
            if refuse and "ipm-hybrid" in result:
                if kept and not cfg.rerank_likelihood:  # kept scores hold no likelihood to rerank by
                    result["ipm-hybrid"] = rescored_hybrid(result["ipm-hybrid"], kept, cfg)
                else:  # nothing to rank again from: never pass on figures of other settings
                    del result["ipm-hybrid"]
                result["reused_from"].setdefault("fusion", {k: had[k] for k in FUSION})
            out[conv_id] = result
    return out


def write(per_conv: dict, evaluated: list[str], systems: tuple[str, ...], args, cfg, info: dict) -> dict:
    """Score and write the results of the conversations finished so far."""
    overall = {s: micro([r[s] for r in per_conv.values()]) for s in systems}
    skipped = sum(r["skipped_no_gold"] for r in per_conv.values())
    for o in overall.values():
        # The shared README's reference figures keep the questions no memory answers, as misses.
        n = o["n"] + skipped
        o["skipped_as_misses"] = {"n": n, **{k: o.get(k, 0.0) * o["n"] / max(1, n) for k in METRICS}}
    name = f"locomo-{args.variant}" + ("-baselines" if args.baselines_only else "")  # never overwrite a full run
    configured = (cfg.fusion_adapter, cfg.fusion_dense, cfg.fusion_bm25)
    # (kept scores hold no likelihood: under the rerank, a fusion ranked again from them is not this run's)
    fusion = {} if args.baselines_only or cfg.rerank_likelihood else sweep(per_conv, args.tune_on.split(","), configured, cfg.fusion_bm25_floor,
                                                  cfg.fusion_bm25_noise)
    # Every candidate's scores, for re-analysis; too bulky for the results JSON.
    scores = {c: r["candidate_scores"] for c, r in per_conv.items() if r.get("candidate_scores")}
    scores_file = Path(args.out_dir) / f"{name}-candidates.json.gz"
    if scores:
        common.write_kept_scores(scores_file, scores)
    else:  # never leave an older run's scores beside these results
        scores_file.unlink(missing_ok=True)
    data = {
        "benchmark": name, "seed": args.seed, "variant": args.variant, "inputs": [str(p) for p in args.paths],
        "conversations": list(per_conv), "planned": evaluated, "categories": CATEGORIES,
        "limit_memories": args.limit_memories, "ids": args.ids, "out_of_scope": args.out_of_scope,
        "baselines_only": args.baselines_only, "bm25_scores": "raw",
        **{k: sum(r[k] for r in per_conv.values())
           for k in ("memories", "questions", "skipped_no_gold", "skipped_no_evidence", "out_of_scope_questions")},
        "train_seconds": {c: r.get("train_seconds") for c, r in per_conv.items()},
        "config": cfg.to_dict(),
        "overall": overall,
        "fusion_sweep": fusion,
        "per_conversation": {c: {k: v for k, v in r.items() if k != "candidate_scores"} for c, r in per_conv.items()},
        "run": info,
    }
    limit = f", {args.limit_memories} memories per conversation" if args.limit_memories else ""
    done = "" if len(per_conv) == len(evaluated) else f", {len(per_conv)} of {len(evaluated)} conversations so far"
    common.write_results(name, data, table(overall), args.out_dir, args.json, notes=notes(data),
                         title=f"LoCoMo retrieval recall ({args.variant}{limit}{done})",
                         tables=[("Fusion weights (hybrid decoding)", sweep_table(fusion))] if fusion else [])
    return data


def table(overall: dict) -> list[dict]:
    rows = []
    for system, o in overall.items():
        extra = {f"recall@1 {CATEGORIES[c]}": m["recall@1"] for c, m in o.get("by_category", {}).items()}
        rows.append(common.row(system, o, **extra, **common.answer_columns(o)))
    return rows


def sweep_table(f: dict) -> list[dict]:
    """The weights worth reading: chosen on the tuning conversations, configured default,
    adapter alone among the candidates, retrievers alone, and the top of the grid."""
    label = {f["chosen"]: "chosen on tuning convs", f["configured"]: "configured default",
             f["adapter_only"]: "adapter alone (no fusion)", f["retrievers_only"]: "retrievers alone (no adapter)"}
    rows = sorted(f["grid"], key=lambda r: (-r["tune"]["recall@1"], -r["tune"]["mrr"]))
    shown = [r for r in rows if r["weights"] in label] + [r for r in rows[:5] if r["weights"] not in label]
    out = []
    for r in shown:
        a, d, b = r["weights"]
        out.append(common.row(f"adapter {a:g}, dense {d:g}, bm25 {b:g}", r["all"],
                              **{"recall@1 tuning convs": r["tune"]["recall@1"],
                                 "recall@1 other convs": (r["rest"] or {}).get("recall@1"),
                                 "note": label.get(r["weights"], "")}))
    return out


def notes(d: dict) -> list[str]:
    as_misses = "; ".join(f"{s} " + " / ".join(f"{100 * o['skipped_as_misses'][f'recall@{k}']:.1f}" for k in common.KS)
                          for s, o in d["overall"].items())
    out = [f"{len(d['conversations'])} conversation(s) ({', '.join(d['conversations'])}), {d['memories']} "
           f"{d['variant']} as memories, {d['questions']} questions of categories 1-4 scored; skipped: "
           f"{d['skipped_no_gold']} whose evidence turns no memory comes from, {d['skipped_no_evidence']} "
           "with no evidence in the data.",
           "Recall in %, micro-averaged over all questions (per category likewise). IPM recall is of its ranking, "
           "also when it abstains; its answers are columns of their own (answered right is `ipm eval`'s recall@1, "
           "an abstention being a miss).",
           "IPM is trained on questions generated from the memories only, never on the LoCoMo questions.",
           f"Counting the {d['skipped_no_gold']} questions no memory answers as misses (as the reference figures "
           f"in ../shared/README.md do), recall@1/5/10 % is: {as_misses}."]
    f = d.get("fusion_sweep")
    if f:
        chosen = next(r for r in f["grid"] if r["weights"] == f["chosen"])
        rest = f" and {100 * chosen['rest']['recall@1']:.1f} on the other {f['n_rest']}" if chosen["rest"] else ""
        out.append(f"Hybrid fusion weights (adapter, dense, bm25) chosen on {', '.join(f['tune_on'])} "
                   f"({f['n_tune']} questions): {f['chosen']}, recall@1 {100 * chosen['tune']['recall@1']:.1f} "
                   f"there{rest}. The ipm-hybrid row uses the configured weights {f['configured']}. BM25 scores "
                   f"are divided by max(the question's best, {f.get('bm25_floor', 0.0):g}) throughout"
                   + (f", after {f['bm25_noise']:g} is taken off each (never below 0)." if f.get("bm25_noise") else "."))
    reused = {c: r["reused_from"] for c, r in d["per_conversation"].items() if "reused_from" in r}
    if reused:
        out.append("Taken from earlier runs with the same configuration (--reuse): " + "; ".join(
            f"{c} from {r['file']} (commit {str(r['commit'])[:7]}, {str(r['utc'])[:10]})" for c, r in reused.items()) + ".")
        rescored = {c: r["fusion"] for c, r in reused.items() if "fusion" in r}
        if rescored:
            old = next(iter(rescored.values()))
            out.append(f"Hybrid recall of {', '.join(rescored)} computed again from the kept candidate scores with this "
                       f"run's fusion settings (those runs had {', '.join(f'{k} {v:g}' for k, v in old.items())}); "
                       "their abstention and out-of-scope figures are not comparable and are left out.")
        # Recall does not depend on them, the out-of-scope refusal rate does.
        odd = {c: r["out_of_scope_questions"] for c, r in d["per_conversation"].items()
               if r["out_of_scope_questions"] != d["out_of_scope"]}
        if odd:
            out.append(f"Out-of-scope questions differ from --out-of-scope {d['out_of_scope']} in "
                       + ", ".join(f"{c} ({n})" for c, n in odd.items()) + ": refusal rates count what each had.")
    if not d["baselines_only"]:
        out.append(f"IPM training: {sum(d['train_seconds'].values()):.0f} s in all; "
                   f"{d['out_of_scope_questions']} out-of-scope questions from the other conversations.")
    return out


if __name__ == "__main__":
    main()
