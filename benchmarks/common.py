"""What every benchmark script shares: flags, config, progress bars, run info and result files.

A benchmark result is only worth something if a reader can tell what was measured, on what,
with which code, and redo it. So every script writes the same three files,
results/<name>.{json,md,png}: the JSON holds every number plus the machine, the package
versions, the seed, the config and the command line; the Markdown table and the chart are
views of it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # measure this checkout's ipm, installed or not
SHARED = REPO.parent / "shared" / "data"
KS = (1, 5, 10)
PACKAGES = ("ipm", "torch", "transformers", "peft", "bm25s", "sentence-transformers")


# -- flags and config --------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--home", type=Path, default=None, help="ipm home to use (default: a temporary one, deleted after)")
    p.add_argument("--seed", type=int, default=0, help="seed for training and for any sampling (default 0)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the JSON results to OUT")
    p.add_argument("--out-dir", type=Path, default=Path("results"),
                   help="where <name>.{json,md,png} go (default ./results)")
    g = p.add_argument_group("ipm config overrides (default: the ipm.Config defaults)")
    g.add_argument("--base-model", default=None, help="local HF model directory or .gguf file (default: SmolLM2-135M)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--questions-per-memory", type=int, default=None)
    g.add_argument("--question-kinds", default=None, metavar="K,K",
                   help="built-in question kinds to train on (templates, wh, keywords, spans, id; '' = none)")
    g.add_argument("--question-source", choices=("builtin", "llm", "both"), default=None)
    g.add_argument("--lora-layers", type=int, default=None)
    g.add_argument("--decoding", choices=("pure", "hybrid"), default=None)
    g.add_argument("--id-scheme", choices=("salient", "lexicon"), default=None,
                   help="how IDs are minted for memories given without one")
    g.add_argument("--set", action="append", default=[], metavar="KEY=JSON", dest="overrides",
                   help="any ipm.Config field, the value as JSON: --set lora_r=64 --set 'question_kinds=[\"wh\"]' "
                        "(repeatable; wins over the flags above)")
    return p


def overrides(pairs: list[str]) -> dict:
    """`--set KEY=JSON` pairs as a dict (a value that is not JSON is taken as a string)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# The config flags of `parser` (attribute names), in the order a benchmark forwards them.
CONFIG_FLAGS = ("base_model", "epochs", "questions_per_memory", "question_kinds", "question_source", "lora_layers",
                "decoding", "id_scheme")


def config_argv(args: argparse.Namespace) -> list[str]:
    """The config flags that were given, as command-line arguments for another benchmark."""
    out = [a for f in CONFIG_FLAGS if getattr(args, f) is not None for a in ("--" + f.replace("_", "-"), str(getattr(args, f)))]
    return out + [a for pair in args.overrides for a in ("--set", pair)]


def config(args: argparse.Namespace):
    """ipm.Config defaults, with the seed and whatever overrides were given on the command line
    (`--set` last, so it wins over a named flag). Every decoding the benchmark scores (its
    `decodings`, default both) is calibrated at training time, so each is scored with its own
    abstention threshold."""
    import ipm

    extra = overrides(getattr(args, "overrides", []))
    if "seed" in extra:
        raise SystemExit("use --seed, not --set seed=...: the seed also seeds the benchmark's own sampling")
    try:
        cfg = ipm.Config().updated(seed=args.seed, base_model=args.base_model, epochs=args.epochs,
                                   questions_per_memory=args.questions_per_memory, lora_layers=args.lora_layers,
                                   decoding=args.decoding, id_scheme=args.id_scheme,
                                   question_source=args.question_source,
                                   question_kinds=None if args.question_kinds is None else
                                   [k for k in args.question_kinds.split(",") if k]
                                   ).updated(**extra)
        scored = set(cfg.also_calibrate) | set(getattr(args, "decodings", DECODINGS))
        return cfg.updated(also_calibrate=sorted(scored - {cfg.decoding}))
    except ipm.InvalidInput as e:
        raise SystemExit(f"error: {e}") from None


# Options added since some results were written, whose default is not how those runs behaved.
OFF_BEFORE = {"fusion_bm25_floor": 0.0,  # BM25 scores divided by the best one alone
              "fusion_bm25_noise": 0.0,  # nothing taken off BM25 scores
              "expand_retrievers": False,  # retrievers matched memory texts only
              "also_calibrate": ["pure"],  # both decodings calibrated (hybrid was the configured one)
              "quantize": "none"}  # asked in the model's dtype (before int8 asks, and before "auto")


def run_config(recorded: dict) -> dict:
    """A results file's config as JSON, with any ipm.Config field added since that run at the
    value that reproduces how it ran: off (OFF_BEFORE), or the default where a new option is
    introduced off."""
    import ipm

    return {**json.loads(json.dumps(ipm.Config().to_dict())), **OFF_BEFORE, **recorded}


DECODINGS = ("hybrid", "pure")


def evaluate_systems(mem, questions, user: str, bars, label: str, decodings=DECODINGS,
                     baselines=("bm25", "dense"), memories=None, hybrid_answers: list | None = None) -> dict:
    """IPM with each decoding on the same trained index ("ipm-hybrid", "ipm-pure"), then the
    baselines on the same memories (default: the namespace's) and questions: {system: metrics}.
    If `hybrid_answers` is a list, hybrid decoding is asked for every candidate it ranks (the
    metrics still use the top 10) and each (question, Answer) is appended to it."""
    from ipm.evaluate import evaluate_baseline, evaluate_ipm

    default = mem.config.decoding
    out = {}
    try:
        for d in decodings:
            mem.reconfigure(decoding=d)
            keep = hybrid_answers if d == "hybrid" else None
            out[f"ipm-{d}"] = ranked_layout(evaluate_ipm(mem, questions, user, progress=bars.eval(f"{label} {d}"),
                                                         k=100 if keep is not None else 10, answers=keep))
    finally:
        mem.reconfigure(decoding=default)
    memories = mem.memories_in_order(user) if memories is None else memories
    for name in baselines:
        out[name] = evaluate_baseline(name, [m.id for m in memories], [m.text for m in memories], questions)
    return out


def kept_scores(answers: list) -> list[dict]:
    """Every hybrid candidate's three scores (adapter log-probability, cosine, raw BM25) for
    each in-scope (question, Answer) that `evaluate_systems` kept: what a fusion can be scored
    on again without training (see benchmarks/locomo.py's sweep, benchmarks/fusion_kept.py)."""
    return [{"gold": sorted(q.gold), "category": q.category,
             "candidates": {h.id: [h.signals.lora, h.signals.dense, h.signals.bm25] for h in a.candidates}}
            for q, a in answers if q.gold is not None]


def write_kept_scores(path: Path, scores) -> None:
    """Kept candidate scores beside the results (gzipped JSON: too bulky for the results file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(scores, f)


def ranked_layout(m: dict) -> dict:
    """IPM's metrics as the benchmarks keep them: recall@k and MRR of its ranking (its best
    guesses, also when it abstains), which compare like for like with the baselines' and can
    be ranked again from kept scores, and `answered_correct`, the share it answered with a
    right memory first (what `ipm eval` reports as recall@1, an abstention being a miss)."""
    ranking = m["ranking"]
    rest = {k: v for k, v in m.items() if k not in ranking and k != "ranking"}
    return {**ranking, "answered_correct": m.get("recall@1", 0.0), **rest}


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def home(path: Path | None):
    """The ipm home to benchmark in: the given directory, or a temporary one removed afterwards."""
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="ipm-bench-") as tmp:
        yield Path(tmp) / "home"


# -- progress ----------------------------------------------------------------------------
class Bars:
    """rich progress bars (on stderr) fed by ipm's callbacks: one bar per label and phase."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "Bars":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, description: str, done: int, total: int, info: str = "") -> None:
        if description not in self.tasks:
            self.tasks[description] = self.progress.add_task(description, total=total, info=info)
        self.progress.update(self.tasks[description], completed=done, total=total, info=info)

    def train(self, label: str):
        """For `IPM.train(progress=...)`: (phase, done, total, loss)."""
        def callback(phase: str, done: int, total: int, loss: float | None) -> None:
            self.update(f"{label} {phase}", done, total, "" if loss is None else f"loss {loss:.3f}")
        return callback

    def eval(self, label: str):
        """For `ipm.evaluate.evaluate(progress=...)`: (done, total)."""
        return lambda done, total: self.update(f"{label} eval", done, total)


# -- run info ----------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checked-out commit: the IPM_BENCH_COMMIT environment variable if set (a copy of the
    tree on a lent GPU machine, whose .git may be absent or stale), else read from .git
    directly (no git binary needed)."""
    if os.environ.get("IPM_BENCH_COMMIT"):
        return os.environ["IPM_BENCH_COMMIT"]
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def command(script: str, argv: list[str] | None) -> list[str]:
    """The command line of a benchmark whose main() got `argv` (None: the real one)."""
    return [str(Path(script).resolve().relative_to(REPO)), *(sys.argv[1:] if argv is None else argv)]


def _git_dirty() -> bool | None:
    """Whether the code a result depends on (src/, benchmarks/) differs from the checked-out
    commit; None where git cannot tell (no git binary, a copy of the tree without .git, or one
    whose commit comes from IPM_BENCH_COMMIT, whose .git may be stale)."""
    if os.environ.get("IPM_BENCH_COMMIT"):
        return None
    try:
        st = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain", "--", "src",
                             "benchmarks"],
                            capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(st.stdout.strip()) if st.returncode == 0 else None


MATMUL_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}


def _cpu_note(machine: dict) -> str:
    """" (Intel(R) Xeon(R) Processor; amx_bf16 ...)" for a results file's footer; "" for a run
    recorded before the CPU was."""
    if not machine.get("cpu") and not machine.get("cpu_flags"):
        return ""
    return f" ({'; '.join(x for x in (machine.get('cpu'), ' '.join(machine.get('cpu_flags', []))) if x)})"


def run_info(seed: int, argv: list[str] | None = None) -> dict:
    """Everything needed to tell two runs apart: machine, versions, seed, command, time.
    `argv` is the whole command line, script first (default sys.argv)."""
    import torch

    from ipm.config import Config
    from ipm.model import PROMPT, _cpu_flags, _cpuinfo, int8_suits_device, pick_device, pick_dtype

    argv = sys.argv if argv is None else argv
    device = pick_device(Config())  # where the defaults run here
    return {
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            # the dtype "auto" picks here: bf16 and float32 hosts rank a few questions differently
            "auto_dtype": str(pick_dtype(Config(), device)).removeprefix("torch."),
            # whether quantize = "auto" asks in int8 here, for a Llama-family model on the default device
            "auto_int8": int8_suits_device(device),
            # hosts of one kind differ in what their matmuls run on (AMX or not), which moves the
            # timings and, through the kernels' rounding, a question or two of recall
            "cpu": _cpuinfo("model name") or platform.processor(),
            "cpu_flags": sorted(_cpu_flags() & MATMUL_FLAGS),
        },
        "versions": {p: _version(p) for p in PACKAGES},
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "seed": seed,
        "prompt": PROMPT,  # what the indexes were trained and asked with (absent: ipm's LEGACY_PROMPT)
        "command": shlex.join(["python", *argv]),
        "python": sys.executable,
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# -- result files ------------------------------------------------------------------------
def _percent(key: str) -> bool:
    return key.startswith("recall@") or key.endswith("%")


def _cell(key: str, value) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}" if _percent(key) else f"{value:.3f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict]) -> str:
    """One row per system: recall@1/5/10 (in %), MRR, n, then any extra columns the rows carry
    (a fraction is shown in % when its column name starts with "recall@" or ends with "%")."""
    cols = ["system", "recall@1", "recall@5", "recall@10", "mrr", "n"]
    cols += [c for c in dict.fromkeys(k for r in rows for k in r) if c not in cols]
    head = [c + " %" if _percent(c) and not c.endswith("%") else {"mrr": "MRR"}.get(c, c) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def chart(rows: list[dict], title: str, path: Path) -> None:
    """Grouped bars: recall@k for k in 1/5/10, one colour per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(KS))]
        bars = ax.bar(xs, [100 * (r.get(f"recall@{k}") or 0) for k in KS], width, label=r["system"])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(KS)), [f"recall@{k}" for k in KS])
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(name: str, data: dict, table_rows: list[dict], out_dir: str | Path = "results",
                  json_out: str | Path | None = None, title: str | None = None, notes: list[str] = (),
                  tables: list[tuple[str, list[dict]]] = ()) -> list[Path]:
    """Write <out_dir>/<name>.json (data + run info), .md (table, notes, then any further
    (heading, rows) tables) and .png (chart of the first table); also the JSON to `json_out`
    if given. Prints and returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "run" not in data:
        data = {**data, "run": run_info(data.get("seed", 0))}
    title = title or name
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    paths[0].write_text(text, encoding="utf-8")
    run = data["run"]
    md = [f"# {title}", "", markdown_table(table_rows), ""]
    md += [f"- {n}" for n in notes]
    for heading, rows in tables:
        md += ["", f"## {heading}", "", markdown_table(rows)]
    dirty = " with uncommitted changes" if run.get("git_dirty") else ""
    md += ["", f"Run {run['utc']}, seed {run['seed']}, commit {run['git_commit']}{dirty}, "
               f"{run['machine']['platform']}, {run['machine']['cpu_count']} CPUs{_cpu_note(run['machine'])}, "
               f"GPU {run['machine']['cuda']}.",
           f"Command: `{run['command']}`", ""]
    paths[1].write_text("\n".join(md), encoding="utf-8")
    chart(table_rows, title, paths[2])
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(text, encoding="utf-8")
        paths.append(Path(json_out))
    for p in paths:
        print(f"wrote {p}")
    return paths


def answer_columns(m: dict) -> dict:
    """IPM's answer-or-abstain columns for a table row (empty for a baseline; only invalid IDs
    and latency for hybrid figures ranked again from kept scores, see locomo.py)."""
    if "abstained" not in m:
        return {"invalid IDs %": m["invalid_id_rate"], "p50 ms": m.get("latency_ms_p50")} if "invalid_id_rate" in m else {}
    return {"answered right %": m["answered_correct"], "abstained %": m["abstained"],
            "wrong answer %": m["wrong_answer_rate"], "out-of-scope refused %": m.get("out_of_scope", {}).get("refused"),
            "invalid IDs %": m["invalid_id_rate"], "p50 ms": m["latency_ms_p50"]}


def row(system: str, metrics: dict, **extra) -> dict:
    """A table row from an ipm.evaluate metrics dict."""
    return {"system": system, **{k: metrics.get(k) for k in ("recall@1", "recall@5", "recall@10", "mrr", "n")}, **extra}
