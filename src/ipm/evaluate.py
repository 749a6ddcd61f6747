"""Held-out evaluation of IPM, and of the retrievers a user would pick instead (BM25, dense).

Every system is scored on the same memories and the same questions with the same metrics.
A questions file is `[{"question", "memory_id"}]`: `memory_id` may be a list (any of them is
right) or null (no memory answers it: an out-of-scope question, which should be refused).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .config import read_user_file
from .engine import decode_records, labelled_records
from .errors import InvalidInput
from .retrieve import RETRIEVERS
from .store import check_question

KS = (1, 5, 10)


@dataclass
class Question:
    question: str
    gold: frozenset[str] | None  # None: out of scope
    category: str | None = None


def load_questions(path: str | Path) -> list[Question]:
    """A questions file: a JSON list or JSON lines of {"question", "memory_id", "category"?},
    read as an import file is (engine.decode_records); a bad record is named."""
    data, kind = decode_records(read_user_file(path, "questions file"), str(path))
    records = labelled_records(data, kind) if kind == "lines" or isinstance(data, list) else None
    if not records:
        raise InvalidInput(f"{path} must be a non-empty list of {{\"question\", \"memory_id\"}} objects")
    out = []
    for label, rec in records:
        where = f"{path}: {label}"
        expected = f"{where}: expected {{\"question\": str, \"memory_id\": str | [str, ...] | null}}"
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or "memory_id" not in rec:
            raise InvalidInput(expected)
        try:
            check_question(rec["question"])
        except InvalidInput as e:
            raise InvalidInput(f"{where}: {e}") from None
        gold = rec["memory_id"]
        if isinstance(gold, str):
            gold = [gold]
        if gold is not None and not (isinstance(gold, list) and gold and all(isinstance(g, str) for g in gold)):
            raise InvalidInput(expected)
        gold = None if gold is None else frozenset(gold)
        category = rec.get("category")  # null: no category, as if left out
        out.append(Question(rec["question"], gold, None if category is None else str(category)))
    return out


def ranking_metrics(rankings: Sequence[Sequence[str]], golds: Sequence[frozenset[str]]) -> dict:
    """recall@k and MRR (within the top max(KS)) of ranked ID lists against gold sets."""
    n = len(golds)
    out = {"n": n}
    if not n:
        return out
    for k in KS:
        out[f"recall@{k}"] = sum(bool(set(r[:k]) & g) for r, g in zip(rankings, golds)) / n
    rr = []
    for r, g in zip(rankings, golds):
        rank = next((i for i, mid in enumerate(r[:max(KS)]) if mid in g), None)
        rr.append(0.0 if rank is None else 1 / (rank + 1))
    out["mrr"] = sum(rr) / n
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def evaluate_ipm(mem, questions: list[Question], user: str, progress: Callable[[int, int], None] | None = None,
                 k: int = max(KS), answers: list | None = None) -> dict:
    """Ask every question. recall@k and MRR count an abstention as a miss at every k (the
    answer was "no memory"); `ranking` holds the same metrics of IPM's best guesses also
    when it abstains, which compare like for like with the baselines' rankings. Also:
    abstentions, wrong answers, refusals of out-of-scope questions, invalid IDs and latency
    (of asks to a loaded engine: a first ask, not timed, loads the models). If `answers` is a
    list, each (question, Answer) is appended to it."""
    live = set(mem.store.ids(user))
    in_scope = [q for q in questions if q.gold is not None]
    oos = [q for q in questions if q.gold is None]
    if questions:
        mem.ask(questions[0].question, k=k, user=user, log=False)  # warm-up: loading is not a query's latency
    rankings, abstained, latencies, returned, invalid, wrong = [], [], [], 0, 0, 0
    oos_refused = 0
    for i, q in enumerate(in_scope + oos):
        t0 = time.perf_counter()
        ans = mem.ask(q.question, k=k, user=user, log=False)
        latencies.append((time.perf_counter() - t0) * 1000)
        if answers is not None:
            answers.append((q, ans))
        ids = [h.id for h in ans.hits]
        ranking = [h.id for h in ans.candidates]
        # Hits and the best guesses behind an abstention overlap: count each returned ID once.
        shown = set(ids) | set(ranking)
        returned += len(shown)
        invalid += sum(mid not in live for mid in shown)
        if q.gold is None:
            oos_refused += ans.abstained
        else:
            rankings.append(ranking)
            abstained.append(ans.abstained)
            if not ans.abstained and ids and ids[0] not in q.gold:
                wrong += 1
        if progress:
            progress(i + 1, len(questions))
    golds = [q.gold for q in in_scope]
    answered = [[] if a else r for a, r in zip(abstained, rankings)]
    out = ranking_metrics(answered, golds)
    out.update({
        "abstained": sum(abstained) / len(in_scope) if in_scope else 0.0,
        "wrong_answer_rate": wrong / len(in_scope) if in_scope else 0.0,
        "invalid_id_rate": invalid / returned if returned else 0.0,
        "latency_ms_p50": round(_pct(latencies, 50), 2), "latency_ms_p95": round(_pct(latencies, 95), 2),
    })
    if oos:
        out["out_of_scope"] = {"n": len(oos), "refused": oos_refused / len(oos)}
    out["ranking"] = ranking_metrics(rankings, golds)
    if any(q.category is not None for q in in_scope):
        out["by_category"] = by_category(in_scope, answered)
        out["ranking"]["by_category"] = by_category(in_scope, rankings)
    return out


def by_category(in_scope: list[Question], rankings) -> dict:
    """ranking_metrics per question category (questions without one are left out)."""
    cats = sorted({q.category for q in in_scope if q.category is not None})
    return {c: ranking_metrics([r for r, q in zip(rankings, in_scope) if q.category == c],
                               [q.gold for q in in_scope if q.category == c]) for c in cats}


BASELINES = RETRIEVERS


def check_baselines(names: Sequence[str]) -> None:
    wrong = [b for b in names if b not in BASELINES]
    if wrong:
        raise InvalidInput(f"unknown baseline {wrong[0]!r}; choose from {', '.join(BASELINES)}")


def evaluate_baseline(name: str, ids: list[str], texts: list[str], questions: list[Question]) -> dict:
    check_baselines([name])
    in_scope = [q for q in questions if q.gold is not None]
    system = BASELINES[name](ids, texts)
    t0 = time.perf_counter()
    rankings = system.rank([q.question for q in in_scope])
    seconds = time.perf_counter() - t0
    out = ranking_metrics(rankings, [q.gold for q in in_scope])
    out["latency_ms_mean"] = round(seconds * 1000 / max(1, len(in_scope)), 3)
    cats = by_category(in_scope, rankings)
    if cats:
        out["by_category"] = cats
    return out


def evaluate(mem, questions: list[Question], user: str = "default", baselines: Sequence[str] = (),
             progress: Callable[[int, int], None] | None = None) -> dict:
    """The `ipm eval` report: {"n", "ipm": {...}, "<baseline>": {...}}."""
    check_baselines(baselines)  # before the evaluation, not after it
    if mem.config.max_k < max(KS):
        raise InvalidInput(f"ipm eval scores recall@{max(KS)} and needs max_k of at least {max(KS)} "
                           f"(it is {mem.config.max_k} in this config: raise it for the evaluation)")
    known = set(mem.store.ids(user))
    unknown = sorted({m for q in questions if q.gold for m in q.gold} - known)
    if unknown:
        raise InvalidInput(f"the questions name {len(unknown)} memory ID(s) not in namespace {user!r}, "
                           f"e.g. {unknown[0]!r}: import those memories first")
    report = {"n": sum(q.gold is not None for q in questions), "ipm": evaluate_ipm(mem, questions, user, progress)}
    memories = mem.memories_in_order(user)
    for name in baselines:
        report[name] = evaluate_baseline(name, [m.id for m in memories], [m.text for m in memories], questions)
    return report
