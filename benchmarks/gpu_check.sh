#!/usr/bin/env bash
# The GPU check of issue 14, section 4 (and, with --vit, issue 16's): one script, under 8 minutes
# (--vit: 9.5) on one CUDA GPU, everything into one log.
#
#   bash benchmarks/gpu_check.sh                  # on a CUDA machine; log: $OUT/gpu_check.log or ./gpu_check.log
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # the same sections on this CPU at tiny sizes
#   bash benchmarks/gpu_check.sh --vit [--cpu-dry-run]  # issue 16's GPU steps instead: sections 1, 7, 8
#   DATA=/path/cifar10-jpeg.tar.gz LOG=/tmp/g.log bash benchmarks/gpu_check.sh
#
# Sections (each under its own time limit, so the whole stays under 8 minutes; a failed or
# timed-out section is logged and the next one runs):
#   1. environment: GPU, driver, torch, CPU model
#   2. one training step of every method, bf16 + channels_last (benchmarks/run.py --only steps)
#   3. the same with torch.compile (train.compile=true; benchmarks/run.py --compile)
#   4. the pinned non-blocking host->device copies: DeviceLoader with data.device_budget_gb=0
#      keeps the images in pinned host memory; checks is_pinned and times the batches against
#      the on-device path
#   5. images/s of SimCLR ResNet-18 (width 1), CIFAR-10, batch 512: selfsup pretrain and the
#      lightly runner (benchmarks/peers/run.py, DataLoader with one worker per core), one epoch
#      each, same run; skipped with a note when no peer environment exists (setup.sh needs PyPI)
#   6. a SimCLR run of about 4-5 minutes (cifar10-simclr, epochs sized from section 5's epoch
#      time): kNN, seconds per epoch, then `selfsup eval linear` on its backbone (and any online
#      linear-probe figure the run's metrics hold)
#   7. (--vit) one epoch of DINO ViT-S/16 (imagenet-dino-vits16: 2 x 224 + 8 x 96 crops) on a
#      generated ImageNet-shaped image folder (random 256-px JPEGs): images/s and peak CUDA memory
#   8. (--vit) a short CIFAR-10 run of each new method (Barlow Twins, VICReg, MoCo v3, NNCLR on
#      ResNet-18; DINO and MoCo v3 on the CIFAR ViT-Tiny): kNN against random init, the monitors
# Published anchors to set beside the figures: a single-file SimCLR reference reaches 11.9 s/epoch
# on one A100 (ResNet-18, batch 512); lightly's benchmark runs about 25 s/epoch on one A6000.
set -uo pipefail

DRY=0; VIT=0
if [ "${1:-}" = "--vit" ]; then VIT=1; shift; fi
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY=1; shift; fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
LOG="${LOG:-${OUT:+$OUT/}gpu_check.log}"
WORK="${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
CORES="$(nproc)"
START=$(date +%s)
BUDGET=$(( DRY ? 2400 : (VIT ? 570 : 470) ))  # seconds for the whole script

if [ -z "${DATA:-}" ]; then
  for d in "$REPO/../shared/data/cifar10-jpeg.tar.gz" "$REPO/shared/data/cifar10-jpeg.tar.gz" \
           "$(dirname "$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || echo /nonexistent)")/../shared/data/cifar10-jpeg.tar.gz"; do
    [ -f "$d" ] && DATA="$(cd "$(dirname "$d")" && pwd)/$(basename "$d")" && break
  done
fi
DATA="${DATA:-cifar10}"

if [ $DRY = 1 ]; then
  # tiny, and only SimCLR in sections 2-3: the point is that every section runs
  DEVICE=cpu; WIDTH=0.125; BATCH=16; SIZE=16; PAIR_STEPS=1; PAIR_BATCH=128; PAIR_WIDTH=0.125; PAIR_TEST=(--test-images 100)
  RUN_DATA=digits; RUN_PRESET=digits-simclr; RUN_SECONDS=30; LIN_EPOCHS=5; STEP_METHODS="simclr"
else
  DEVICE=cuda; WIDTH=1; BATCH=512; SIZE=32; PAIR_STEPS=97; PAIR_BATCH=512; PAIR_WIDTH=1; PAIR_TEST=()
  RUN_DATA="$DATA"; RUN_PRESET=cifar10-simclr; RUN_SECONDS=240; LIN_EPOCHS=100; STEP_METHODS=""
fi

log() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# section NAME LIMIT CMD...: run CMD with its output in the log, under min(LIMIT, time left)
section() {
  local name="$1" limit="$2"; shift 2
  local l; l=$(left); [ "$l" -lt "$limit" ] && limit=$l
  log ""; log "== $name (limit ${limit}s; $(date -u +%H:%M:%S); load $(cut -d' ' -f1-3 /proc/loadavg))"
  if [ "$limit" -le 5 ]; then log "skipped: the script's time budget is spent"; return 1; fi
  local t0; t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "-- $name: rc $rc$([ $rc = 124 ] && echo ' (timed out)') in $(( $(date +%s) - t0 ))s"
  return $rc
}

: >"$LOG"
log "# benchmarks/gpu_check.sh $([ $DRY = 1 ] && echo '--cpu-dry-run (tiny sizes, CPU)') $(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "repo $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'); data $DATA; work $WORK; $CORES cores"

section "1. environment" 60 bash -c "
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo 'no nvidia-smi'
  lscpu | grep -E 'Model name|^CPU\(s\)' ; grep -o -m1 -w amx_tile /proc/cpuinfo || echo 'no AMX'
  $PY -c 'import torch, selfsup; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \"selfsup\", selfsup.__version__)'
"
if [ $DRY = 0 ] && ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  log "no CUDA device: run with --cpu-dry-run on a CPU machine"; exit 2
fi

if [ $VIT = 0 ]; then
section "2. one step of every method: bf16, channels_last" $(( DRY ? 400 : 90 )) \
  $PY benchmarks/run.py --only steps --device $DEVICE --precision bf16 --batch $BATCH --size $SIZE --width $WIDTH \
      --iters 1 --rounds 1 ${STEP_METHODS:+--methods $STEP_METHODS}

section "3. the same with torch.compile (train.compile=true)" $(( DRY ? 400 : 120 )) \
  $PY benchmarks/run.py --only steps --device $DEVICE --precision bf16 --batch $BATCH --size $SIZE --width $WIDTH \
      --iters 1 --rounds 1 --compile --methods $([ $DRY = 1 ] && echo simclr || echo "${STEP_METHODS:-simclr,moco,byol,simsiam,swav,dino}")

section "4. pinned non-blocking copies (DeviceLoader, data.device_budget_gb=0)" $(( DRY ? 120 : 40 )) $PY - "$DEVICE" "$BATCH" <<'PY'
import sys, time
import numpy as np, torch
from selfsup.loader import DeviceLoader
device, batch = torch.device(sys.argv[1]), int(sys.argv[2])
images = np.random.default_rng(0).integers(0, 256, (batch * 40, 32, 32, 3), dtype=np.uint8)
if device.type != "cuda":
    print("CPU: no host->device copies (pinning needs CUDA); the loader keeps the images as they are")
    loader = DeviceLoader(images, batch, device, budget_gb=0.0)
    print("batches", sum(1 for _ in loader.batches(0)), "of", batch)
    sys.exit(0)
for budget, what in ((8.0, "on the device"), (0.0, "pinned host memory, non_blocking copies")):
    loader = DeviceLoader(images, batch, device, budget_gb=budget)
    print(f"{what}: images on {loader.images.device}, pinned {loader.images.is_pinned() if loader.images.device.type == 'cpu' else '-'}")
    for _ in loader.batches(0):
        pass
    torch.cuda.synchronize(); t0 = time.perf_counter()
    n = 0
    for epoch in range(1, 4):
        for b in loader.batches(epoch):
            n += len(b)
    torch.cuda.synchronize()
    print(f"  {n / (time.perf_counter() - t0):.0f} images/s through the loader alone")
PY

PEER_PY="${PEERS_VENV:-/work/peers-venv}/bin/python"
[ -x "$PEER_PY" ] || PEER_PY="$($PY -c 'import lightly, sys; print(sys.executable)' 2>/dev/null || true)"
if [ -n "$PEER_PY" ] && [ -x "$PEER_PY" ]; then
  section "5. images/s, SimCLR ResNet-18 width $PAIR_WIDTH, batch $PAIR_BATCH: selfsup, then lightly ($CORES workers)" \
    $(( DRY ? 900 : 150 )) \
    $PY benchmarks/peers/run.py --methods simclr --seeds 0 --steps $PAIR_STEPS --batch $PAIR_BATCH \
        --width $PAIR_WIDTH --device $DEVICE --workers "$CORES" --threads "$CORES" --peer-python "$PEER_PY" \
        --data "$DATA" "${PAIR_TEST[@]}" --work "$WORK/peers" --jsonl "$WORK/peers.jsonl" --doc none
  [ -f "$WORK/peers.jsonl" ] && cat "$WORK/peers.jsonl" >>"$LOG"
else
  log ""; log "== 5. skipped: no peer environment (bash benchmarks/peers/setup.sh, which needs PyPI) and no lightly here"
  section "5. images/s, SimCLR ResNet-18 width $PAIR_WIDTH, batch $PAIR_BATCH: selfsup alone" 120 \
    $PY -m selfsup pretrain --preset cifar10-simclr --data "$DATA" --out "$WORK/simclr-epoch" --no-progress \
        --set train.epochs=1 train.batch_size=$PAIR_BATCH model.width=$PAIR_WIDTH train.device=$DEVICE eval.knn_every=0
fi

# seconds per epoch of selfsup from section 5 (its metrics), to size section 6 at RUN_SECONDS
EPOCHS=$($PY - "$WORK" "$RUN_SECONDS" "$DRY" <<'PY'
import json, sys
from pathlib import Path
work, seconds, dry = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
if dry:
    print(1); sys.exit()
per_epoch = None
for m in list(work.glob("peers/*/selfsup/metrics.jsonl")) + list(work.glob("simclr-epoch/metrics.jsonl")):
    rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "images_per_s" in r]
    if rows:
        per_epoch = 50000 // 512 * 512 / rows[-1]["images_per_s"]
print(max(1, int(seconds // per_epoch)) if per_epoch else 20)
PY
)
section "6. a SimCLR run of about $RUN_SECONDS s ($EPOCHS epochs of $RUN_PRESET, width $WIDTH)" $(( DRY ? 400 : RUN_SECONDS + 90 )) \
  $PY -m selfsup pretrain --preset $RUN_PRESET --data "$RUN_DATA" --out "$WORK/simclr-run" --no-progress \
      --set train.epochs=$EPOCHS train.device=$DEVICE model.width=$WIDTH train.max_minutes=$(( RUN_SECONDS / 60 + 1 )) \
            "eval.knn_every=$(( EPOCHS > 10 ? EPOCHS / 4 : 1 ))" "optim.warmup_epochs=$(( EPOCHS > 10 ? EPOCHS / 10 : 0 ))"
$PY - "$WORK/simclr-run" "$RUN_PRESET" >>"$LOG" 2>&1 <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
import yaml
rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()] if (run / "metrics.jsonl").exists() else []
batch = yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] if (run / "config.yaml").exists() else 0
for r in rows:
    if "images_per_s" in r:
        per_epoch = r["step"] // r["epoch"] * batch / r["images_per_s"]
        extra = {k: v for k, v in r.items() if "knn" in k or "linear" in k or "online" in k}
        print(f"epoch {r['epoch']}: {per_epoch:.1f} s/epoch, {r['images_per_s']:.0f} img/s, loss {r['loss']:.4f} {extra}")
print(f"{len(rows)} metric lines in {run}/metrics.jsonl")
PY
section "6b. linear evaluation of that backbone (selfsup eval linear, $LIN_EPOCHS epochs)" 60 \
  $PY -m selfsup eval linear --checkpoint "$WORK/simclr-run" --data "$RUN_DATA" --device $DEVICE --epochs $LIN_EPOCHS
fi

if [ $VIT = 1 ]; then
# 7. DINO ViT-S/16 on an ImageNet-shaped folder (dry run: 64-px images, 32-px crops, a few steps)
if [ $DRY = 1 ]; then INET=(16 64 8 "aug.size=64 data.image_size=64 multicrop.local_size=32 dino.out_dim=256"); \
else INET=(1024 256 128 ""); fi  # images per class (x 10 classes), side, batch, extra settings
section "7a. an ImageNet-shaped folder: 10 classes x ${INET[0]} train images of ${INET[1]} px" 60 \
  $PY - "$WORK/inet" "${INET[0]}" "${INET[1]}" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, per_class, side = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
for split, n in (("train", per_class), ("val", max(2, per_class // 10))):
    for c in range(10):
        (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):  # smooth random images: JPEG-sized like ImageNet's, not noise
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((side, side), Image.BICUBIC).save(root / split / f"n{c:08d}" / f"{i}.JPEG", quality=90)
print("wrote", root)
PY
section "7b. one epoch of DINO ViT-S/16 (imagenet-dino-vits16, batch ${INET[2]}): images/s, peak memory" $(( DRY ? 600 : 150 )) \
  $PY - "$WORK" "$DEVICE" "${INET[2]}" ${INET[3]} <<'PY'
import json, sys
from pathlib import Path
import torch
from selfsup.cli import main
work, device, batch, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
rc = main(["pretrain", "--preset", "imagenet-dino-vits16", "--data", str(work / "inet"), "--out", str(work / "dino-vits16"),
           "--no-progress", "--set", "train.epochs=1", f"train.batch_size={batch}", f"train.device={device}",
           "eval.knn_every=0", "eval.online_linear=false", "optim.warmup_epochs=0", *extra])
rows = [json.loads(x) for x in (work / "dino-vits16" / "metrics.jsonl").read_text().splitlines() if x.strip()]
peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
print(f"rc {rc}; {rows[-1]['images_per_s']:.0f} img/s (2 global + 8 local crops each), loss {rows[-1]['loss']:.4f}, "
      f"peak CUDA memory {peak:.1f} GiB")
PY
# 8. a short run of each new method on CIFAR-10 (dry run: digits, 1 epoch, tiny)
if [ $DRY = 1 ]; then NEW_DATA=digits; NEW_SETS="train.epochs=1 train.batch_size=32 model.width=0.125"; NEW_SIZE="aug.size=16"; \
else NEW_DATA="$DATA"; NEW_SETS="train.epochs=2 train.batch_size=256 optim.warmup_epochs=0.2"; NEW_SIZE="aug.size=32"; fi
for p in cifar10-barlow-twins cifar10-vicreg cifar10-mocov3 cifar10-nnclr cifar10-dino-vit-tiny cifar10-mocov3-vit-tiny; do
  case $p in *vit*) sets="$NEW_SETS $NEW_SIZE dino.freeze_last_layer_epochs=0.1"; sets="${sets//model.width=0.125/}";;
             *nnclr*) sets="$NEW_SETS nnclr.support_size=$([ $DRY = 1 ] && echo 128 || echo 8192)";; *) sets="$NEW_SETS";; esac
  [ "${p%vit-tiny}" = cifar10-mocov3- ] && sets="${sets// dino.freeze_last_layer_epochs=0.1/}"
  section "8. $p: a short run ($sets)" $(( DRY ? 300 : 55 )) \
    $PY -m selfsup pretrain --preset $p --data "$NEW_DATA" --out "$WORK/new-$p" --no-progress \
        --set train.device=$DEVICE eval.knn_every=1 $sets
done
fi

log ""; log "# done in $(( $(date +%s) - START ))s; log $LOG; runs under $WORK"
