#!/usr/bin/env bash
# The GPU check (issue 24): what one lent CUDA GPU can tell us in one call of at most 6 minutes.
#
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/    # once; carry .data (and .whl)
#   bash benchmarks/gpu_check.sh [--out DIR] [--only 1,2]   # results in $OUT, else --out, else ./gpu_check_out
#   bash benchmarks/gpu_check.sh --cpu-dry-run              # every section at tiny sizes on this CPU (< 3 min)
#
# Environment: PYTHON (default python3, the machine's PyTorch: nothing is installed or downloaded),
# DATA (default .data/cifar10-jpeg.tar.gz in the repository), WORK (scratch: the runs and the decoded
# cache, SELFSUP_CACHE=$WORK/cache; default a new temp dir, removed at exit unless KEEP_WORK=1).
# Wheels in .whl/ (e.g. lightly 1.6.0) are installed with pip --no-index --no-deps into
# $WORK/site, on the path of section 5 only.
#
# Sections, most decisive first, each under its own time limit (a failed or timed-out one is logged
# and the next runs; the whole stays within BUDGET seconds):
#   1. the machine: nvidia-smi, torch and CUDA versions; measured ceilings: a bf16 8192^3 matmul's
#      TFLOP/s (CUDA events) and a device-to-device copy's GB/s (bytes read + written)
#   2. the headline: `selfsup pretrain --preset cifar10-simclr` (ResNet-18 width 1, batch 512, bf16,
#      monitors off) for 8 epochs: s/epoch over epochs 2-8 (metrics.jsonl `seconds`), wall; then
#      train.compile=true for 5 epochs: compile time (epoch 1 - steady) apart from s/epoch. The
#      archive is decoded into the cache first, timed apart.
#   3. step / bare-backbone ratio (benchmarks/run.py --only steps, 10 steps x 5 rounds, bf16) of
#      simclr, moco, byol, swav, dino at batch 512 (+ a profiler table), SimCLR at batch 64 (the
#      per-GPU share of 8 GPUs at 512); the eager run's epoch / (steps x bare step)
#   4. DINO ViT-S/16 (imagenet-dino-vits16: 2 x 224 + 8 x 96 views of random 256-px images) at batch
#      128 and 256: img/s, peak CUDA memory
#   5. lightly's SimCLR (benchmarks/peers/lightly_side.py, one DataLoader worker per core) for 2
#      epochs, against section 2's steady state; skipped when lightly does not import
#   6. the compiled run's epoch / (steps x bare step), the bare backbone compiled the same way
# Out (at most 8 files): summary.json (every number; rewritten after each step, so always valid),
# gpu_check.log, simclr-eager.metrics.jsonl, simclr-compiled.metrics.jsonl, profile.txt.
set -uo pipefail

DRY=0; ONLY=""; OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
    --only|--sections) ONLY=",${2:?--only needs section numbers, e.g. 1,2},"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${OUT_DIR:-$PWD/gpu_check_out}"
DATA="${DATA:-$REPO/.data/cifar10-jpeg.tar.gz}"

# Stop at once, before any import, when the data did not travel.
if [ $DRY = 0 ] && [ ! -f "$DATA" ]; then
  echo "gpu_check.sh: no CIFAR-10 archive at $DATA; in the repository run \`mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/\` and carry .data (or set DATA=/path/cifar10-jpeg.tar.gz)" >&2
  exit 2
fi
[ -f "$DATA" ] && DATA="$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")"  # the script runs from the repo
PY="${PYTHON:-python3}"
if ! TORCH_INFO="$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, int(torch.cuda.is_available()))' 2>/dev/null)"; then
  if [ $DRY = 1 ] && [ -z "${PYTHON:-}" ] && TORCH_INFO="$(python -c 'import torch; print(torch.__version__, None, 0)' 2>/dev/null)"; then
    PY=python  # this machine's python3 lacks torch; its python has it
  else
    echo "gpu_check.sh: $PY cannot import torch; set PYTHON to an interpreter with PyTorch" >&2; exit 2
  fi
fi
if [ $DRY = 0 ] && [ "${TORCH_INFO##* }" != 1 ]; then
  echo "gpu_check.sh: no CUDA device (torch ${TORCH_INFO% *}); on a CPU machine run bash benchmarks/gpu_check.sh --cpu-dry-run" >&2
  exit 2
fi

cd "$REPO"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -z "${WORK:-}" ]; then  # ours: removed at exit (runs, decoded cache), unless KEEP_WORK=1
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
  [ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" SELFSUP_CACHE="$WORK/cache"
LOG="$OUT_DIR/gpu_check.log"; SUMMARY="$OUT_DIR/summary.json"; PROFILE="$OUT_DIR/profile.txt"
rm -f "$LOG" "$SUMMARY" "$PROFILE" "$OUT_DIR"/simclr-*.metrics.jsonl
CORES="$(nproc)"
START=$(date +%s)

if [ $DRY = 1 ]; then  # tiny: the point is that every section's code runs
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # 2 shared cores: one thread each is faster than contention
  BUDGET=175; DEVICE=cpu; PRESET=digits-simclr; RUN_DATA=digits; EPOCHS=(2 2)
  RUN_SETS=(model.width=0.125 train.batch_size=32 data.image_size=16 train.precision=auto)
  BATCH=16; SMALL_BATCH=32; ITERS=1; ROUNDS=1; STEPS=(--size 16 --width 0.125 --precision auto --profile-steps 2)
  MACHINE=(--matmul-n 256 --copy-mib 16)
  VIT=(--vit-batches 4,8 --vit-size 32 --iters 1 --rounds 1 --precision auto --vit-set model.backbone=vit_tiny
       model.patch_size=8 aug.size=32 multicrop.local_size=16 dino.out_dim=256 model.proj_hidden=256)
  LIMITS=(30 30 40 100 30 60 30 30 30 30 60)
else
  BUDGET=330; DEVICE=cuda; PRESET=cifar10-simclr; RUN_DATA="$DATA"; EPOCHS=(8 5)
  RUN_SETS=(model.width=1 train.batch_size=512 train.precision=bf16)
  BATCH=512; SMALL_BATCH=64; ITERS=10; ROUNDS=5; STEPS=(--size 32 --width 1 --precision bf16)
  MACHINE=(--matmul-n 8192 --copy-mib 1024)
  VIT=(--vit-batches 128,256 --iters 5 --rounds 3 --precision bf16)
  LIMITS=(45 90 150 170 30 110 40 40 75 100 90)
fi
BENCH=("$PY" benchmarks/run.py --device "$DEVICE")
# limits (s): machine, decode, eager run, compiled run, run summary, steps, steps at the small batch,
# eager e2e, vit, lightly, compiled e2e; each also capped by what is left of BUDGET

log() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
now_ms() { date +%s%3N; }
secs() { printf '%d.%03d' $(( $1 / 1000 )) $(( $1 % 1000 )); }  # milliseconds -> seconds

# record KEY NAME=VALUE...: set summary.json's KEY.NAME to VALUE (JSON, else a string);
# record @FILE: deep-merge FILE (a JSON object written by benchmarks/run.py --json) into summary.json.
# The file is replaced atomically: it is valid whenever the script stops.
record() {
  "$PY" - "$SUMMARY" "$@" <<'PY'
import json, sys
from pathlib import Path
from selfsup.files import write_text_atomic
path, key, *items = sys.argv[1:]
summary = json.loads(Path(path).read_text()) if Path(path).exists() else {}

def merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v

if key.startswith("@"):
    if Path(key[1:]).exists():
        merge(summary, json.loads(Path(key[1:]).read_text()))
else:
    entry = summary.setdefault(key, {})
    for item in items:
        name, value = item.split("=", 1)
        try:
            entry[name] = json.loads(value)
        except ValueError:
            entry[name] = value
write_text_atomic(json.dumps(summary, indent=1) + "\n", path)
PY
}

# section NAME LIMIT CMD...: CMD's output into the log, under min(LIMIT, time left); rc and seconds
# into summary.json's "sections"
section() {
  local name="$1" limit="$2"; shift 2
  local l; l=$(left); [ "$l" -lt "$limit" ] && limit=$l
  log ""; log "== $name (limit ${limit}s; $(date -u +%H:%M:%S); load $(cut -d' ' -f1-3 /proc/loadavg))"
  if [ "$limit" -le 5 ]; then
    log "skipped: the ${BUDGET}s budget is spent"
    record sections "$name={\"status\": \"skipped: budget spent\"}"
    return 1
  fi
  local t0; t0=$(now_ms)
  timeout --signal=INT --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$? dt=$(( $(now_ms) - t0 ))
  local status=ok; [ $rc != 0 ] && status="failed (rc $rc)"; [ $rc = 124 ] && status="timed out"
  log "-- $name: $status in $(secs $dt)s"
  record sections "$name={\"status\": \"$status\", \"rc\": $rc, \"seconds\": $(secs $dt), \"limit\": $limit}"
  return $rc
}

# train NAME EPOCHS LIMIT SET...: the headline run $WORK/NAME; its metrics into $OUT, its epochs
# (s/epoch, compile time, wall minus training) into summary.json's "headline"
train() {
  local name="$1" epochs="$2" limit="$3"; shift 3
  local t0; t0=$(now_ms)
  section "2. $name: $PRESET, $epochs epochs" "$limit" \
    "$PY" -m selfsup pretrain --preset "$PRESET" --data "$RUN_DATA" --out "$WORK/$name" --no-progress \
      --set train.epochs="$epochs" train.device=$DEVICE eval.knn_every=0 eval.online_linear=false \
            train.checkpoint_every=1000 train.progress=false "${RUN_SETS[@]}" "$@"
  local wall=$(( $(now_ms) - t0 ))
  [ -f "$WORK/$name/metrics.jsonl" ] || return 1
  cp "$WORK/$name/metrics.jsonl" "$OUT_DIR/simclr-$name.metrics.jsonl"
  section "2. $name: its epochs" "${LIMITS[4]}" "${BENCH[@]}" --only e2e --runs "$WORK/$name" \
    --walls "$(secs $wall)" --key "headline/$name" --json "$WORK/$name.json"
  record "@$WORK/$name.json"
}

: >"$LOG"
log "# benchmarks/gpu_check.sh$([ $DRY = 1 ] && echo ' --cpu-dry-run (tiny sizes, CPU)') $(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "repo $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'); $PY: torch $TORCH_INFO (version, CUDA, available);" \
    "data $DATA; work $WORK; out $OUT_DIR; $CORES cores; budget ${BUDGET}s"
record run "command=benchmarks/gpu_check.sh$([ $DRY = 1 ] && echo ' --cpu-dry-run')" "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" "python=$PY" "torch=$TORCH_INFO" \
  "cores=$CORES" "budget_s=$BUDGET" "dry_run=$DRY"

LIGHTLY_PATH=""
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  if "$PY" -m pip install --no-index --no-deps --quiet --target "$WORK/site" "$REPO"/.whl/*.whl >>"$LOG" 2>&1; then
    LIGHTLY_PATH="$WORK/site"; log "installed $(ls "$REPO"/.whl/*.whl | xargs -n1 basename | tr '\n' ' ')into $WORK/site (section 5 only)"
  else
    log "pip install --no-index of .whl/ failed (see above); section 5 goes without"
  fi
fi

if wanted 1; then
  log ""; log "== 1. the machine"
  GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  CPU="$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
  log "nvidia-smi: $GPU"; log "CPU: $CPU ($CORES cores)"
  record machine "nvidia_smi=$GPU" "cpu=$CPU"
  section "1. ceilings: bf16 matmul, device copy" "${LIMITS[0]}" "${BENCH[@]}" --only machine "${MACHINE[@]}" \
    --json "$WORK/machine.json"
  record "@$WORK/machine.json"
fi
CEILING=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["machine"]["matmul_tflops"])' "$SUMMARY" 2>/dev/null || true)

if wanted 2; then
  section "2. decode $RUN_DATA into the cache" "${LIMITS[1]}" "${BENCH[@]}" --only decode --data "$RUN_DATA" \
    --key headline/decode --json "$WORK/decode.json"
  record "@$WORK/decode.json"
  train eager "${EPOCHS[0]}" "${LIMITS[2]}"
  train compiled "${EPOCHS[1]}" "${LIMITS[3]}" train.compile=true train.compile_mode=default
fi

if wanted 3; then
  section "3. step / bare backbone, batch $BATCH" "${LIMITS[5]}" "${BENCH[@]}" --only steps "${STEPS[@]}" \
    --batch $BATCH --iters $ITERS --rounds $ROUNDS --methods simclr,moco,byol,swav,dino \
    ${CEILING:+--ceiling-tflops "$CEILING"} --profile "$PROFILE" --key "steps/batch $BATCH" --json "$WORK/steps.json"
  section "3. step / bare backbone, SimCLR at batch $SMALL_BATCH" "${LIMITS[6]}" "${BENCH[@]}" --only steps \
    "${STEPS[@]}" --batch $SMALL_BATCH --iters $ITERS --rounds $ROUNDS --methods simclr \
    ${CEILING:+--ceiling-tflops "$CEILING"} --key "steps/batch $SMALL_BATCH" --json "$WORK/steps-small.json"
  record "@$WORK/steps.json"
  record "@$WORK/steps-small.json"
  if [ -f "$WORK/eager/metrics.jsonl" ]; then
    section "3. the eager run against the rig" "${LIMITS[7]}" "${BENCH[@]}" --only e2e --runs "$WORK/eager" \
      --measure-bare --with-step --iters $ITERS --rounds $ROUNDS --key e2e/eager --json "$WORK/e2e-eager.json"
    record "@$WORK/e2e-eager.json"
  fi
fi

if wanted 4; then
  section "4. DINO ViT-S/16 steps" "${LIMITS[8]}" "${BENCH[@]}" --only vit "${VIT[@]}" --json "$WORK/vit.json"
  record "@$WORK/vit.json"
fi

if wanted 5; then
  if [ -f "$WORK/eager/metrics.jsonl" ]; then
    section "5. lightly SimCLR, 2 epochs, $CORES workers" "${LIMITS[9]}" \
      env PYTHONPATH="${LIGHTLY_PATH:+$LIGHTLY_PATH:}$PYTHONPATH" "${BENCH[@]}" --only lightly --runs "$WORK/eager" \
      --lightly-epochs 2 --workers "$CORES" --work "$WORK" --json "$WORK/lightly.json"
    record "@$WORK/lightly.json"
  else
    log ""; log "== 5. skipped: no eager run of section 2 to compare with"
    record lightly "skipped=no eager run of section 2"
  fi
fi

if wanted 6; then
  if [ -f "$WORK/compiled/metrics.jsonl" ]; then
    section "6. the compiled run against the bare backbone compiled alike" "${LIMITS[10]}" "${BENCH[@]}" --only e2e \
      --runs "$WORK/compiled" --measure-bare --iters $ITERS --rounds $ROUNDS --key e2e/compiled \
      --json "$WORK/e2e-compiled.json"
    record "@$WORK/e2e-compiled.json"
  else
    log ""; log "== 6. skipped: no compiled run of section 2"
  fi
fi

log ""; log "# done in $(( $(date +%s) - START ))s; results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
record run "seconds=$(( $(date +%s) - START ))"
