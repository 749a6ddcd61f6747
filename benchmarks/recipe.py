"""Which training recipe wins held-out? One LoCoMo run per recipe (epochs, learning rate, LoRA rank, layers).

    python benchmarks/recipe.py                          # conv-26 observations, every recipe
    python benchmarks/recipe.py ../shared/data/locomo/conv-{26,30,41}.json --conversations 3 --recipes default,layers_all
    python benchmarks/recipe.py --recipes default,epochs8 --collate     # re-tabulate kept results

Each recipe is a set of ipm.Config overrides on top of the defaults; each trains a fresh index
on the same memories, and benchmarks/locomo.py scores it on the held-out LoCoMo questions
(pure, adapter among the hybrid candidates, hybrid), with BM25 and dense in the same run.
Writes results/recipe.{json,md,png}; each recipe's full LoCoMo output goes to results/recipe/<name>/.
Choose on conversations 26/30/41 (the tuning split); conv-42/43 stay untouched for reporting.
"""

from __future__ import annotations

import json

import common
from question_mix import run_variants, variant_parser

# name -> ipm.Config overrides. "default" is ipm.Config as it is.
RECIPES = {
    "default": {},
    "epochs2": {"epochs": 2},
    "epochs8": {"epochs": 8},
    "lr3e-4": {"learning_rate": 3e-4},
    "lr3e-3": {"learning_rate": 3e-3},
    "r8": {"lora_r": 8, "lora_alpha": 16},
    "r64": {"lora_r": 64, "lora_alpha": 128},
    "layers6": {"lora_layers": 6},
    "layers20": {"lora_layers": 20},
    "layers_all": {"lora_layers": 0},
    "q48": {"questions_per_memory": 48},
}
SHOWN = ("epochs", "learning_rate", "lora_r", "lora_layers", "questions_per_memory")


def main(argv: list[str] | None = None) -> dict:
    p = variant_parser(__doc__.split("\n\n")[0], RECIPES, "recipes")
    args = p.parse_args(argv)
    names = [r for r in args.recipes.split(",") if r]
    unknown = set(names) - set(RECIPES)
    if unknown:
        p.error(f"unknown recipes: {', '.join(sorted(unknown))}")
    variants = {n: [a for k, v in RECIPES[n].items() for a in ("--set", f"{k}={json.dumps(v)}")] for n in names}
    describe = lambda c: {k: c[k] for k in SHOWN}  # noqa: E731
    return run_variants(p, args, common.command(__file__, argv), "recipe", variants, describe,
                        f"Training recipe ablation (LoCoMo {args.variant})",
                        ["lora_layers 0 = LoRA in every layer; otherwise in the top N layers (the engine's fast path)."])


if __name__ == "__main__":
    main()
