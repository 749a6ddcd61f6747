"""Which training recipe wins held-out? One LoCoMo run per recipe (epochs, learning rate, LoRA rank, layers).

    python benchmarks/recipe.py                          # conv-26 observations, every recipe
    python benchmarks/recipe.py ../shared/data/locomo/conv-{26,30,41}.json --conversations 3 --recipes default,layers_all
    python benchmarks/recipe.py --recipes default,epochs8 --collate     # re-tabulate kept results

Each recipe is a set of ipm.Config overrides on top of the defaults; see benchmarks/variants.py
for how each is scored. Writes results/recipe.{json,md,png}; each recipe's full LoCoMo output
goes to results/recipe/<name>/. Choose on conversations 26/30/41 (the tuning split); conv-42/43
stay untouched for reporting.
"""

from __future__ import annotations

import common
import variants

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
    "q12": {"questions_per_memory": 12},
    "q48": {"questions_per_memory": 48},
    "hardneg": {"hard_negatives": 10},
    "hardneg_w3": {"hard_negatives": 10, "hard_negative_weight": 3.0},
}
SHOWN = ("epochs", "learning_rate", "lora_r", "lora_layers", "questions_per_memory", "hard_negatives",
         "hard_negative_weight")


def describe(config: dict) -> dict:
    """The shown fields of a run's config (a field added since the run at its default)."""
    full = common.run_config(config)
    return {k: full[k] for k in SHOWN}


def main(argv: list[str] | None = None) -> dict:
    return variants.main(argv, script=__file__, doc=__doc__, bench="recipe", variants=RECIPES, what="recipes",
                         describe=describe, title="Training recipe ablation (LoCoMo)",
                         notes=["lora_layers 0 = LoRA in every layer; otherwise in the top N layers (the fast path)."])


if __name__ == "__main__":
    main()
