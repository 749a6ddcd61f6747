"""Which training mix wins held-out? Train the demo index under several configs and score each.

    python benchmarks/ablation.py --grid default,layers_all,epochs8 [--json OUT]

Each named config is a set of `ipm.Config` overrides (see GRID). Every run starts from a fresh
home with the same memories and the same held-out questions; IPM figures only (the baselines
do not depend on the config: `ipm eval --baselines` gives them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import ipm  # noqa: E402
from ipm.evaluate import evaluate, load_questions  # noqa: E402

GRID = {
    "default": {},
    "layers_all": {"lora_layers": 0},
    "layers_20": {"lora_layers": 20},
    "layers_6": {"lora_layers": 6},
    "epochs8": {"epochs": 8},
    "epochs2": {"epochs": 2},
    "q48": {"questions_per_memory": 48},
    "q12": {"questions_per_memory": 12},
    "r64": {"lora_r": 64, "lora_alpha": 128},
    "lr3e-4": {"learning_rate": 3e-4},
    "lr3e-3": {"learning_rate": 3e-3},
    "llm_both": {"question_source": "both"},
    "all_e8_q48": {"lora_layers": 0, "epochs": 8, "questions_per_memory": 48},
    "l20_e8_q48": {"lora_layers": 20, "epochs": 8, "questions_per_memory": 48},
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="default", help=f"comma-separated names from: {', '.join(GRID)}")
    p.add_argument("--memories", default=str(ROOT / "examples/demo/memories.jsonl"))
    p.add_argument("--questions", default=str(ROOT / "examples/demo/questions.json"))
    p.add_argument("--base-model", default=None)
    p.add_argument("--set", action="append", default=[], help="extra override KEY=JSON for every run")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    questions = load_questions(args.questions)
    rows = {}
    for name in args.grid.split(","):
        over = {**GRID[name], **extra}
        if args.base_model:
            over["base_model"] = args.base_model
        with tempfile.TemporaryDirectory() as home:
            mem = ipm.open(home, config=ipm.Config().updated(**over))
            mem.import_(args.memories)
            t0 = time.perf_counter()
            manifest = mem.train()
            train_s = time.perf_counter() - t0
            r = evaluate(mem, questions)["ipm"]
            rows[name] = {"overrides": over, "train_seconds": round(train_s, 1),
                          "examples": manifest["metrics"]["examples"], **{k: v for k, v in r.items() if k != "by_category"}}
            print(name, json.dumps(rows[name]), flush=True)
            out = {"machine": platform.platform(), "command": " ".join(sys.argv), "results": rows}
            if args.json_out:  # after every run, so a run cut short still reports
                Path(args.json_out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
