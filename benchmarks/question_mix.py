"""Which training questions make the adapter find the right memory? One LoCoMo run per mix.

    python benchmarks/question_mix.py                       # conv-26 observations, every mix
    python benchmarks/question_mix.py --mixes no-wh,all --conversations 2
    python benchmarks/question_mix.py --mixes no-wh,wh --collate        # re-tabulate kept results

Each mix trains a fresh index with only those sources of training inputs (every mix also trains
on the memory's own text); see benchmarks/variants.py for how each is scored. Writes
results/question-mix.{json,md,png}; each mix's full LoCoMo output goes to results/question-mix/<mix>/.
"""

from __future__ import annotations

import variants

from ipm.questions import DEFAULT_QUESTION_KINDS

ALL = list(DEFAULT_QUESTION_KINDS)
# name -> ipm.Config overrides. "all" is the ipm.Config default.
MIXES = {
    "text": {"question_kinds": [], "question_source": "builtin"},  # the memory's own text only
    "spans": {"question_kinds": ["spans"], "question_source": "builtin"},  # doc-as-query: sentences and word spans
    "keywords": {"question_kinds": ["keywords"], "question_source": "builtin"},
    "templates": {"question_kinds": ["templates"], "question_source": "builtin"},
    "wh": {"question_kinds": ["wh"], "question_source": "builtin"},
    "llm": {"question_kinds": [], "question_source": "llm"},  # base-model-written questions, few-shot, filtered
    "no-wh": {"question_kinds": ["templates", "keywords", "spans", "id"], "question_source": "builtin"},  # before wh
    "all": {"question_kinds": ALL, "question_source": "builtin"},
    "all+llm": {"question_kinds": ALL, "question_source": "both"},
    # keyword subsets with common words swapped for their MiniLM neighbours (questions.RelatedWords)
    "all+related": {"question_kinds": ALL + ["related"], "question_source": "builtin"},
}


def main(argv: list[str] | None = None) -> dict:
    describe = lambda c: {"kinds": "+".join(c["question_kinds"]) or "(text only)", "source": c["question_source"]}  # noqa: E731
    return variants.main(argv, script=__file__, doc=__doc__, bench="question-mix", variants=MIXES, what="mixes",
                         describe=describe, title="Question mix ablation (LoCoMo)",
                         notes=["Every mix also trains on the memory's own text; 'all' is ipm.Config's default."])


if __name__ == "__main__":
    main()
