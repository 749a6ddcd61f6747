#!/usr/bin/env bash
# The main job on the demo data: import 100 memories, train the index on the embedded default
# model, ask a few questions, then score held-out recall against BM25 and dense retrieval.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# A home of its own, made afresh on every run (never $IPM_HOME, which may hold a user's store):
# ask it afterwards with `ipm ask --home .ipm-demo "..."`.
export IPM_HOME=.ipm-demo
rm -rf "$IPM_HOME"
ipm import examples/demo/memories.jsonl
ipm train
for q in "what's the name of my dog?" "which medicine am I allergic to?" "when do I see the dentist?" \
         "what is the capital of France?"; do
  echo "> ipm ask \"$q\""
  ipm ask "$q"
done
ipm eval examples/demo/questions.json --baselines bm25,dense
