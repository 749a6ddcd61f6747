"""Speed: the engine's fast path against the naive one, and the ID trie at scale.

Model part (side by side, same training examples, seed and epochs):
  naive   = train_adapter(fast=False): LoRA on every layer, full forward, full-vocabulary
            loss; recall by `generate` with prefix_allowed_tokens_fn (GenerateDecoder);
  default = the engine's path: train_adapter(fast=True) and RunnerDecoder;
  default-N-layers (with --base-layers N) = the default path on N of the base's layers
            (Config.base_layers: the top lora_layers and the lowest others).
on the first --memories demo memories (held-out questions from examples/demo/questions.json)
and, with --locomo, on the first --memories observations of one LoCoMo conversation.
Every default path asks as the engine would, with int8 linear maps where Config.quantize
resolves to them ("auto": a CPU with VNNI or AMX; the table's dtype column says "int8 asks"),
so there a default path in another dtype differs from the default mostly in training (its asks
differ only in the dtype of the embedding and the output head).
Model memory is the peak resident set size above the one at the start of the phase (freed heap
is handed back to the OS first with malloc_trim; Linux: the high-water mark is reset through
/proc/self/clear_refs; elsewhere a ru_maxrss delta, which only shows growth above the earlier
peak). The naive decoder takes one question at a time; the engine's hybrid path also answers a batch
(IPM.ask_many), measured as wall time per question.

Trie part: prefix tries over 10k/100k/1M synthetic `domain_topic_entity` IDs: tokenization,
build, memory (tracemalloc: the trie is plain Python objects), incremental add/remove, and the
per-query constraint overhead without any model forward (trie walks; the per-step vocabulary
union + index tensor + softmax + top-k of the beam search over random logits of the model's
vocabulary size).

    python benchmarks/speed.py --locomo ../shared/data/locomo/conv-26.json   # everything
    python benchmarks/speed.py --memories 30 --epochs 2 --skip-trie          # a cheaper model part
    python benchmarks/speed.py --skip-model                                  # the trie part only
"""

from __future__ import annotations

import ctypes
import gc
import json
import random
import re
import resource
import statistics
import time
import tracemalloc
import warnings
from contextlib import contextmanager
from pathlib import Path

import common

DEMO = common.REPO / "examples" / "demo"
PATHS = ("naive", "default")
RATIO_KEYS = ("examples_per_second", "train_seconds", "index_seconds", "latency_k1_p50_ms", "latency_k1_p95_ms",
              "latency_k5_p50_ms", "latency_k5_p95_ms", "train_peak_rss_mb", "query_peak_rss_mb")


# -- measuring -----------------------------------------------------------------------------
def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that a phase reusing what an earlier
    phase freed still shows up as RSS growth."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def peak_rss(out: dict, key: str):
    """out[key] = peak RSS during the block minus RSS at its start, in MB."""
    _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        start, peak = _rss_kb("VmRSS"), lambda: _rss_kb("VmHWM")
    except OSError:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    out[key] = round(max(0, peak() - start) / 1024, 1)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


# -- model part ------------------------------------------------------------------------------
def demo_set(n: int):
    """The first n demo memories (NewMemory) and the held-out questions about them."""
    from ipm.evaluate import Question, load_questions
    from ipm.store import NewMemory

    lines = [json.loads(line) for line in (DEMO / "memories.jsonl").read_text().splitlines() if line.strip()][:n]
    ids = {r["id"] for r in lines}
    questions = [Question(q.question, q.gold & ids) for q in load_questions(DEMO / "questions.json")
                 if q.gold and q.gold & ids]
    return [NewMemory(r["text"], r["id"], r.get("questions", [])) for r in lines], questions


def locomo_set(path: Path, n: int, mem, user: str):
    """One LoCoMo conversation's first n observations, added to `user`; questions whose
    evidence turns some kept observation comes from (gold: those observations)."""
    import locomo

    from ipm.evaluate import Question
    from ipm.store import NewMemory

    conv = json.loads(Path(path).read_text(encoding="utf-8"))
    mems = locomo.memories(conv, "observations")[:n]
    added = mem.store.add_many(user, [NewMemory(text) for text, _ in mems], source="import")
    turns = {m.id: ids for m, (_, ids) in zip(added, mems)}
    questions = []
    for q in locomo.qa_items(conv):
        gold = frozenset(mid for mid, ids in turns.items() if ids & locomo.dia_ids(q["evidence"]))
        if gold:
            questions.append(Question(q["question"], gold))
    return questions


def timed_queries(rank, questions) -> tuple[list[float], list[list[str]]]:
    """Single warm queries through `rank(question) -> [id, ...]`: latencies in ms and the IDs."""
    rank(questions[0].question)  # warm-up, not counted
    lat, ranked = [], []
    for q in questions:
        t0 = time.perf_counter()
        ranked.append(rank(q.question))
        lat.append((time.perf_counter() - t0) * 1000)
    return lat, ranked


def run_path(path: str, base, examples, ids, questions, cfg, bars, label: str, hybrid=None) -> dict:
    import torch

    from ipm.engine import IPM
    from ipm.model import Runner, id_token_ids
    from ipm.search import GenerateDecoder, RunnerDecoder
    from ipm.train import train_adapter
    from ipm.trie import Trie

    out: dict = {"dtype": str(next(base.model.parameters()).dtype).removeprefix("torch.")}
    cuda = base.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    progress = lambda s, t, loss: bars.update(f"{label} {path} train", s, t, f"loss {loss:.3f}")
    with peak_rss(out, "train_peak_rss_mb"):
        t0 = time.perf_counter()
        result = train_adapter(base, examples, cfg, progress=progress, fast=path.startswith("default"))
        out["train_seconds"] = round(time.perf_counter() - t0, 3)
        t1 = time.perf_counter()
        trie = Trie((mid, id_token_ids(base.tokenizer, mid)) for mid in ids)  # as the engine builds it
        out["index_seconds"] = round(out["train_seconds"] + time.perf_counter() - t1, 3)
    out["examples_per_second"] = round(len(examples) * cfg.epochs / out["train_seconds"], 2)
    out["adapter_metrics"] = result.metrics
    if cuda:
        out["train_cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        torch.cuda.reset_peak_memory_stats()
    int8 = IPM._int8(base, cfg)  # asked as the engine would: int8 as Config.quantize resolves here

    def engine_decoder():
        return RunnerDecoder(base.runner(result.model), base.tokenizer, base.device, int8=int8, model=result.model)

    def recall(ranked, k: int) -> float:
        return sum(bool(set(r[:k]) & q.gold) for r, q in zip(ranked, questions)) / len(questions)

    if path.startswith("default"):
        out["int8"] = int8
        decoder = engine_decoder()
    else:
        decoder = GenerateDecoder(result.model, base.tokenizer, base.device)
    with peak_rss(out, "query_peak_rss_mb"):
        for k in (1, 5):
            bars.update(f"{label} {path} k={k}", 0, len(questions))
            lat, ranked = timed_queries(
                lambda q, k=k: [mid for mid, _ in decoder.search(q, trie, k=k, beam_size=max(k, cfg.beam_size))], questions)
            bars.update(f"{label} {path} k={k}", len(questions), len(questions))
            out[f"recall@{k}"] = recall(ranked, k)
            out[f"latency_k{k}_p50_ms"] = round(pct(lat, 50), 2)
            out[f"latency_k{k}_p95_ms"] = round(pct(lat, 95), 2)
    if cuda:
        out["query_cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if path == "naive" and hybrid is not None and Runner.supports(result.model):
        # What the training shortcut costs the engine's answers: the naive path's adapter asked
        # through hybrid decoding as the default path's is (recall only: asking it costs what
        # asking the default path's adapter costs, bar its float32 embedding and output head).
        ranked = [[mid for mid, _, _ in r] for r in hybrid(engine_decoder(), [q.question for q in questions], trie, 5)]
        out["hybrid_recall"] = {f"recall@{k}": recall(ranked, k) for k in (1, 5)}
    if (path == "default" or path.endswith("-layers")) and hybrid is not None:
        # The engine's default decoding on the same adapter: BM25 and dense propose, the
        # adapter scores their union in one forward pass (tree attention), the scores are fused.
        h = out["hybrid"] = {}
        for k in (1, 5):
            bars.update(f"{label} hybrid k={k}", 0, len(questions))
            lat, ranked = timed_queries(lambda q, k=k: [mid for mid, _, _ in hybrid(decoder, [q], trie, k)[0]], questions)
            bars.update(f"{label} hybrid k={k}", len(questions), len(questions))
            h[f"recall@{k}"] = recall(ranked, k)
            h[f"latency_k{k}_p50_ms"] = round(pct(lat, 50), 2)
            h[f"latency_k{k}_p95_ms"] = round(pct(lat, 95), 2)
        # Batched (IPM.ask_many): all questions in one call, scored 16 per forward pass.
        t0 = time.perf_counter()
        batched = hybrid(decoder, [q.question for q in questions], trie, 5)
        h["batched_ms_per_question"] = round((time.perf_counter() - t0) * 1000 / len(questions), 2)
        h["batched_recall@1"] = sum(bool({r[0][0]} & q.gold) for r, q in zip(batched, questions) if r) / len(questions)
    return out


def model_part(args, cfg, bars) -> dict:
    import ipm
    from ipm.model import PROMPT, load_base

    common.seed_everything(args.seed)
    sets = {}
    with common.home(args.home) as home:
        mem = ipm.open(home, config=cfg)
        base = mem.base()
        # The straightforward version loads the model as transformers does by default (float32).
        naive_base = load_base(cfg.updated(dtype=args.naive_dtype), mem.paths)
        bases = {"naive": naive_base, "default": base}
        if naive_base.model.dtype != base.model.dtype:  # what the dtype alone is worth
            bases["default-" + args.naive_dtype] = naive_base
        if args.base_layers:  # what dropping the middle layers is worth
            bases[f"default-{args.base_layers}-layers"] = load_base(cfg.updated(base_layers=args.base_layers), mem.paths)
        memories, questions = demo_set(args.memories)
        mem.store.add_many("demo", memories, source="import")
        todo = [("demo", "demo", questions)]
        if args.locomo:
            user = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(args.locomo).stem)
            todo.append((f"locomo-{user}", user, locomo_set(args.locomo, args.memories, mem, user)))
        for name, user, qs in todo:
            t0 = time.perf_counter()
            examples, _calibration = mem.training_examples(user, base)
            d = {"memories": mem.store.count(user), "train_examples": len(examples), "held_out_questions": len(qs),
                 "questions_seconds": round(time.perf_counter() - t0, 3)}
            ids = mem.store.ids(user)
            hybrid = None
            if cfg.decoding == "hybrid":  # the engine's retrievers, over the same training questions if expanded
                expansion = None
                if cfg.expand_retrievers:
                    from ipm.engine import group_expansion

                    rows = list(dict.fromkeys((e.question, e.memory_id) for e in examples))
                    expansion = group_expansion(rows, mem._embed_questions(rows),
                                                {m.id: m.text for m in mem.store.list(user)})
                candidates = mem._candidates(mem.memories_in_order(user), expansion=expansion)
                hybrid = lambda decoder, qs, trie, k, c=candidates: mem._rank_many(  # noqa: E731
                    decoder, qs, trie, c, k, prompt=PROMPT)  # the adapters here are trained with it
            for path, b in bases.items():
                d[path] = run_path(path, b, examples, ids, qs, cfg, bars, name, hybrid)
                gc.collect()
            d["paths"] = list(bases)
            d["ratio_default_over_naive"] = {k: round(d["default"][k] / d["naive"][k], 3) if d["naive"][k] else None
                                             for k in RATIO_KEYS}
            sets[name] = d
        mem.store.close()
    return sets


# -- trie part -------------------------------------------------------------------------------
def synthetic_ids(n: int, seed: int) -> list[str]:
    """n distinct `domain_topic_entity` IDs: the engine's (domain, topic) pairs, an entity word
    from the demo memories, and for half of them a number glued on (`anna`, `anna42`)."""
    from ipm.ids import LEXICON

    pairs = sorted(set(LEXICON.values()))
    words = sorted({w for line in (DEMO / "memories.jsonl").read_text().splitlines() if line.strip()
                    for w in re.findall(r"[a-z]{3,}", json.loads(line)["text"].lower())})
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        d, t = rng.choice(pairs)
        w = rng.choice(words)
        out[f"{d}_{t}_{w}{rng.randint(1, 999) if rng.random() < 0.5 else ''}"] = None
    return list(out)


def trie_ops(trie, rng) -> None:
    """What one constrained decode does to the trie, following random branches to a leaf."""
    from ipm.trie import Trie

    _, node = Trie.chain(trie.root)
    while node.memory_id is None:
        _, node = Trie.chain(node.children[rng.choice(node.allowed())])


class _LogitsRunner:
    """Stands in for the model in RunnerDecoder: row i of `h` is beam i's full-vocabulary logits."""

    def logits(self, h, token_ids):
        return h[:, token_ids]


def beam_steps(trie, logits, beam_size: int) -> tuple[float, float, int]:
    """RunnerDecoder.search's loop (k=1) with `logits` (beam_size, vocab) standing in for the
    model, through the decoder's own `_expand`. Returns (seconds in trie calls, seconds in
    union + index tensor + softmax + top-k, steps)."""
    from ipm.search import Beam, RunnerDecoder
    from ipm.trie import Trie

    decoder = RunnerDecoder(_LogitsRunner(), tokenizer=None)
    t_trie = t_union = 0.0
    t = time.perf_counter()
    _, start = Trie.chain(trie.root)
    t_trie += time.perf_counter() - t
    beams, finished, steps = [Beam(0.0, start, 0, [])], [], 0
    while beams:
        steps += 1
        t = time.perf_counter()
        top = decoder._expand(logits[:len(beams)], beams, beam_size)
        t_union += time.perf_counter() - t
        t = time.perf_counter()
        nxt = []
        for logp, bi, tok in top:
            forced, node = Trie.chain(beams[bi].node.children[tok])
            if node.memory_id is not None:
                finished.append(logp)
            else:
                nxt.append(Beam(logp, node, bi, [tok] + forced))
        t_trie += time.perf_counter() - t
        finished.sort(reverse=True)
        if finished and (not nxt or nxt[0].logp <= finished[0]):
            break
        beams = nxt
    return t_trie, t_union, steps


def engine_resync(trie, live: list[str]) -> float:
    """Seconds for the set work IPM._serve does when the namespace's memories changed (an
    add, update or forget since the last ask), all IDs live and indexed; the SQL read of the IDs is not
    included."""
    indexed = dict.fromkeys(live)  # the manifest's {id: sha256}
    t0 = time.perf_counter()
    want = set(live) & set(indexed)
    stale = [mid for mid in list(trie.sequences) if mid not in want]
    missing = want - set(trie.sequences)
    assert not stale and not missing
    return time.perf_counter() - t0


def tokenize(tok, ids: list[str]) -> list[list[int]]:
    """id_token_ids for many IDs in one batched tokenizer call."""
    return [s + [tok.eos_token_id] for s in tok([" " + i for i in ids], add_special_tokens=False).input_ids]


def trie_part(args, cfg, tok, bars) -> dict:
    import torch

    from ipm.model import id_token_ids
    from ipm.trie import Trie

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    vocab_size, extra = len(tok), 1000
    sizes = {}
    for n in args.trie_sizes:
        label = f"trie {n:,}"
        bars.update(label, 0, 5)
        ids = synthetic_ids(n + extra, args.seed)
        d: dict = {"ids": n}
        # Memory: every Python object the tokenization and the build leave alive (the trie with
        # its token tuples and their ints; the ID strings existed before), traced by tracemalloc.
        gc.collect()
        tracemalloc.start()
        trie = Trie(zip(ids[:n], tokenize(tok, ids[:n])))
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        d["trie_mb"], d["build_peak_mb"] = round(current / 2**20, 1), round(peak / 2**20, 1)
        del trie
        gc.collect()
        bars.update(label, 1, 5)
        # Time, untraced: tokenization (batched; one call per ID, as the engine does, on a sample), build.
        t0 = time.perf_counter()
        seqs = tokenize(tok, ids)
        d["tokenize_batch_seconds"] = round(time.perf_counter() - t0, 3)
        sample = ids[:1000]
        t0 = time.perf_counter()
        one_by_one = [id_token_ids(tok, i) for i in sample]
        d["tokenize_one_us_per_id"] = round((time.perf_counter() - t0) / len(sample) * 1e6, 2)
        assert one_by_one == seqs[:len(sample)], "batched tokenization differs from id_token_ids"
        d["tokens_per_id_mean"] = round(sum(map(len, seqs)) / len(seqs), 2)
        t0 = time.perf_counter()
        trie = Trie(zip(ids[:n], seqs[:n]))
        d["build_seconds"] = round(time.perf_counter() - t0, 3)
        bars.update(label, 2, 5)
        d["root_children"] = len(trie.root.allowed())
        t_add, t_rm = [], []
        for i, s in zip(ids[n:], seqs[n:]):
            t0 = time.perf_counter()
            trie.add(i, s)
            t_add.append(time.perf_counter() - t0)
        for i in ids[n:]:
            t0 = time.perf_counter()
            trie.remove(i)
            t_rm.append(time.perf_counter() - t0)
        assert len(trie) == n
        d["add_one_us"] = round(statistics.mean(t_add) * 1e6, 2)
        d["remove_one_us"] = round(statistics.mean(t_rm) * 1e6, 2)
        bars.update(label, 3, 5)
        t0 = time.perf_counter()
        for _ in range(args.trie_queries):
            trie_ops(trie, rng)
        d["trie_ops_us_per_query"] = round((time.perf_counter() - t0) / args.trie_queries * 1e6, 2)
        totals = [0.0, 0.0, 0]
        for _ in range(args.trie_queries):
            logits = torch.randn(cfg.beam_size, vocab_size)
            for j, v in enumerate(beam_steps(trie, logits, cfg.beam_size)):
                totals[j] += v
        q = args.trie_queries
        d["beam_trie_us_per_query"] = round(totals[0] / q * 1e6, 2)
        d["beam_union_index_us_per_query"] = round(totals[1] / q * 1e6, 2)
        d["beam_constraint_us_per_query"] = round((totals[0] + totals[1]) / q * 1e6, 2)
        d["beam_steps_per_query"] = round(totals[2] / q, 2)
        bars.update(label, 4, 5)
        d["engine_resync_ms"] = round(engine_resync(trie, ids[:n]) * 1000, 3)
        sizes[str(n)] = d
        bars.update(label, 5, 5)
        del trie, seqs, ids
        gc.collect()
    return {"tokenizer": getattr(tok, "name_or_path", None), "vocab_size": vocab_size, "beam_size": cfg.beam_size,
            "queries": args.trie_queries, "target_us_per_query_at_1m": 5000, "sizes": sizes}


def load_tokenizer(cfg, home):
    from transformers import AutoTokenizer

    from ipm.config import Paths
    from ipm.model import quiet_transformers, resolve_model

    quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve_model(cfg, Paths.at(home))[1])


# -- output ----------------------------------------------------------------------------------
def table(model: dict) -> list[dict]:
    rows = []
    for name, d in model.items():
        paths = d.get("paths", PATHS)
        for path in (*paths, "ratio_default_over_naive"):
            m = d[path]
            rows.append({"system": f"{name} {path.replace('ratio_default_over_naive', 'default/naive')}",
                         "dtype": m.get("dtype", "") + (", int8 asks" if m.get("int8") else ""),
                         "recall@1": m.get("recall@1"), "recall@5": m.get("recall@5"),
                         "n": d["held_out_questions"] if path in paths else None,
                         "train ex/s": m["examples_per_second"], "index s": m["index_seconds"],
                         **{f"k={k} p{p} ms": m[f"latency_k{k}_p{p}_ms"] for k in (1, 5) for p in (50, 95)},
                         "train peak MB": m["train_peak_rss_mb"], "query peak MB": m["query_peak_rss_mb"]})
        naive = d["naive"]
        if naive.get("hybrid_recall"):
            rows.append({"system": f"{name} naive, hybrid decoding (the naive path's adapter asked as the engine asks)",
                         **naive["hybrid_recall"], "n": d["held_out_questions"]})
        for path in (p for p in paths if d[p].get("hybrid")):
            h = d[path]["hybrid"]
            what = "default" if path == "default" else path
            for label, m in ((f"{what}, hybrid decoding", h),
                             (f"{what} hybrid/naive",
                              {key: round(h[key] / naive[key], 3) for key in h if key.startswith("latency")})):
                rows.append({"system": f"{name} {label}", "recall@1": m.get("recall@1"), "recall@5": m.get("recall@5"),
                             "n": d["held_out_questions"] if "recall@1" in m else None,
                             **{f"k={k} p{p} ms": m[f"latency_k{k}_p{p}_ms"] for k in (1, 5) for p in (50, 95)},
                             "batched ms/question": m.get("batched_ms_per_question")})
    return rows


def trie_markdown(trie: dict) -> str:
    cols = {"IDs": "ids", "tokenize s (batch)": "tokenize_batch_seconds", "tokenize µs/ID (1 by 1)":
            "tokenize_one_us_per_id", "build s": "build_seconds", "trie MB": "trie_mb",
            "build peak MB": "build_peak_mb", "add µs": "add_one_us", "remove µs": "remove_one_us",
            "trie ops µs/query": "trie_ops_us_per_query", "beam trie µs/q": "beam_trie_us_per_query",
            "beam union+index µs/q": "beam_union_index_us_per_query",
            "beam constraint µs/q": "beam_constraint_us_per_query", "steps/q": "beam_steps_per_query",
            "engine resync ms": "engine_resync_ms"}
    lines = [(f"## Trie ({trie['tokenizer']}, vocabulary {trie['vocab_size']}, beam {trie['beam_size']}, "
             f"{trie['queries']} queries per size; target <= 5000 µs/query at 1M IDs)"), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(d.get(k, "")) for k in cols.values()) + " |" for d in trie["sizes"].values()]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    model, trie = data.get("model") or {}, data.get("trie")
    labels = [f"{name}\n{p}" for name in model for p in model[name].get("paths", PATHS)]
    runs = [model[name][p] for name in model for p in model[name].get("paths", PATHS)]
    axes[0].bar(labels, [r["examples_per_second"] for r in runs], color=[f"C{i % 3}" for i in range(len(runs))])
    axes[0].set_title("training examples / s", fontsize=10)
    for j, (key, name) in enumerate((("latency_k1_p50_ms", "k=1 p50"), ("latency_k1_p95_ms", "k=1 p95"),
                                     ("latency_k5_p50_ms", "k=5 p50"), ("latency_k5_p95_ms", "k=5 p95"))):
        axes[1].bar([i + (j - 1.5) * 0.2 for i in range(len(runs))], [r[key] for r in runs], 0.2, label=name)
    axes[1].set_xticks(range(len(runs)), labels)
    axes[1].set_yscale("log")
    axes[1].set_title("query latency, ms (log)", fontsize=10)
    axes[1].legend(fontsize=7)
    if trie:
        xs = [int(n) for n in trie["sizes"]]
        for key, name in (("trie_ops_us_per_query", "trie ops (1 path)"),
                          ("beam_constraint_us_per_query", "beam: trie + union/index"),
                          ("add_one_us", "add one ID"), ("remove_one_us", "remove one ID")):
            axes[2].plot(xs, [d[key] for d in trie["sizes"].values()], "o-", label=name)
        axes[2].axhline(5000, color="red", ls="--", lw=1, label="5 ms target")
        axes[2].set_xscale("log")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("IDs")
        axes[2].legend(fontsize=7)
    axes[2].set_title("trie cost per query / operation, µs", fontsize=10)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--memories", type=int, default=100, metavar="N", help="first N memories per set (default 100)")
    p.add_argument("--locomo", type=Path, default=None, metavar="PATH",
                   help="also measure one LoCoMo conversation's observations, e.g. ../shared/data/locomo/conv-26.json")
    p.add_argument("--trie-sizes", default="10000,100000,1000000", help="comma-separated ID counts")
    p.add_argument("--trie-queries", type=int, default=500, help="simulated queries per trie size (default 500)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: torch's choice); 1 avoids thread thrashing on a busy machine")
    p.add_argument("--naive-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the naive path's base model (default float32, what transformers loads); when it "
                        "differs from the configured dtype, the default path is also run in it")
    p.add_argument("--base-layers", type=int, default=0, metavar="N",
                   help="also run the default path on N of the base model's layers (Config.base_layers)")
    p.add_argument("--skip-model", action="store_true", help="no training or recall: trie part only")
    p.add_argument("--skip-trie", action="store_true", help="model part only")
    args = p.parse_args(argv)
    args.trie_sizes = [int(s) for s in args.trie_sizes.split(",") if s.strip()]

    cfg = common.config(args).updated(threads=args.threads)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # before run_info, which records it
    info = common.run_info(args.seed, common.command(__file__, argv))
    data: dict = {"benchmark": "speed", "seed": args.seed, "config": cfg.to_dict(), "memories_limit": args.memories,
                  "memory_measure": "model part: peak RSS during the phase minus RSS at its start, MB (after "
                                    "malloc_trim; VmHWM reset via /proc/self/clear_refs, else ru_maxrss delta), "
                                    "CUDA peaks from torch on GPU; "
                                    "trie part: tracemalloc (current after the build, and peak), MB",
                  "model": None, "trie": None, "run": info}
    with common.Bars() as bars:
        if not args.skip_model:
            data["model"] = model_part(args, cfg, bars)
        if not args.skip_trie:
            data["trie"] = trie_part(args, cfg, load_tokenizer(cfg, args.home), bars)
    for name, d in (data["model"] or {}).items():
        r = d["ratio_default_over_naive"]
        print(f"{name}: default/naive  train ex/s x{r['examples_per_second']}, index time x{r['index_seconds']}, "
              f"k=1 p50 x{r['latency_k1_p50_ms']}, k=5 p50 x{r['latency_k5_p50_ms']}, "
              f"train peak RSS x{r['train_peak_rss_mb']}; recall@1 naive {d['naive']['recall@1']:.3f} "
              f"default {d['default']['recall@1']:.3f}")
        if d["naive"].get("hybrid_recall"):
            print(f"{name}: naive path's adapter, hybrid decoding: recall@1 {d['naive']['hybrid_recall']['recall@1']:.3f}")
        for path in (p for p in d["paths"] if d[p].get("hybrid")):
            h = d[path]["hybrid"]
            print(f"{name}: {path} path, hybrid decoding (the engine's default): recall@1 {h['recall@1']:.3f}, "
                  f"k=1 p50 {h['latency_k1_p50_ms']} ms, k=5 p50 {h['latency_k5_p50_ms']} ms, "
                  f"batched {h['batched_ms_per_question']} ms/question, train ex/s {d[path]['examples_per_second']}")
    for n, d in (data["trie"] or {"sizes": {}})["sizes"].items():
        print(f"trie {int(n):>9,} IDs: build {d['build_seconds']} s, {d['trie_mb']} MB, add {d['add_one_us']} µs, "
              f"remove {d['remove_one_us']} µs, constraint {d['beam_constraint_us_per_query']} µs/query "
              f"(trie {d['beam_trie_us_per_query']}, union+index {d['beam_union_index_us_per_query']})")
    notes = [("Model part: same training examples, seed and epochs for both paths; recall is the decoder's top-1/top-5 "
             "on held-out questions, no abstention; latency over single warm queries (beam = max(k, config beam))."),
             ("'default, hybrid decoding' is the engine's default query path on the default path's adapter: BM25 and "
              "dense (MiniLM) propose candidates, the adapter scores all of them in one forward pass, the scores "
              "are fused; its latency includes encoding the question with MiniLM and BM25. 'batched ms/question': "
              "all held-out questions in one IPM.ask_many-style call (16 per forward pass), wall time / questions."),
             ("train ex/s = examples x epochs / train_adapter wall time (deep copy, LoRA setup and the fast path's "
              "cached lower layers included); index s = that time + trie build. The engine's `train` also decodes "
              "its calibration questions, not counted here."),
             f"Memory: {data['memory_measure']}."]
    with warnings.catch_warnings():  # its recall chart has nothing to plot under --skip-model
        warnings.simplefilter("ignore")
        paths = common.write_results("speed", data, table(data["model"] or {}), args.out_dir, args.json,
                                     title="IPM speed: default (fast) path vs naive", notes=notes)
    if data["trie"]:
        with paths[1].open("a", encoding="utf-8") as f:
            f.write("\n" + trie_markdown(data["trie"]))
    plot(data, paths[2])  # replaces write_results' recall chart with latency/throughput panels
    return data


if __name__ == "__main__":
    main()
