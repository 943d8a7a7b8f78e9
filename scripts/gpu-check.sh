#!/usr/bin/env bash
# The first-GPU-run check: nine steps on one GPU (H100/H200 or V100), each under its own timeout, the timeouts summing
# to under 9 minutes; one JSON and one markdown report. The steps are dpo_dist/bench/gpu_check.py's plan.
#
#   scripts/gpu-check.sh [--out DIR] [--skip STEP,STEP] [--python PY] [--recipe FILE]
#   scripts/gpu-check.sh --dry-run        # CPU (CI): check that everything the plan uses exists, print the plan
#
#   --out DIR       results: DIR/report.json, DIR/report.md, DIR/steps/, DIR/logs/, DIR/work/ (default gpu-check-out)
#   --python PY     the Python to run with; accelerate, deepspeed, torchrun and dpo-dist must be beside it
#                   (default: the repository's .venv/bin/python)
#   --recipe FILE   the recipe the training steps derive theirs from (default configs/recipes/demo.yaml)
#   --skip LIST     steps to record as skipped
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=gpu-check-out
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=$(command -v python3 || echo python3)
RECIPE="$ROOT/configs/recipes/demo.yaml"
DRY=0
SKIP=""
SUBCOMMANDS="doctor bnb-fsdp2 compact-head nf4-fsdp2 chain sharded bench plan report"

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    --python) PY=$2; shift 2 ;;
    --python=*) PY=${1#*=}; shift ;;
    --recipe) RECIPE=$2; shift 2 ;;
    --recipe=*) RECIPE=${1#*=}; shift ;;
    --skip) SKIP=$2; shift 2 ;;
    --skip=*) SKIP=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
BIN=$(dirname "$PY")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the check's module from this checkout, whatever is installed

if [ "$DRY" = 1 ]; then
  missing=()
  if [ ! -x "$PY" ]; then
    missing+=("python: $PY (--python)")
  else
    for tool in accelerate deepspeed torchrun dpo-dist; do
      [ -x "$BIN/$tool" ] || missing+=("launcher: $BIN/$tool (beside $PY)")
    done
    for sub in $SUBCOMMANDS; do
      "$PY" -m dpo_dist.bench.gpu_check "$sub" --help >/dev/null 2>&1 \
        || missing+=("module: $PY -m dpo_dist.bench.gpu_check $sub --help fails")
    done
  fi
  command -v timeout >/dev/null 2>&1 || missing+=("command: timeout (coreutils)")
  if [ -x "$BIN/dpo-dist" ] && ! "$BIN/dpo-dist" doctor --help >/dev/null 2>&1; then
    echo "note: \`dpo-dist doctor\` is not available yet; step 1 (doctor) will fail"
  fi
  plan_rc=1
  if [ -x "$PY" ]; then
    "$PY" -m dpo_dist.bench.gpu_check plan --out "$OUT" --python "$PY" --recipe "$RECIPE"
    plan_rc=$?
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo
    echo "missing (found by the script):"
    for item in "${missing[@]}"; do echo "  - $item"; done
  fi
  if [ ${#missing[@]} -gt 0 ] || [ "$plan_rc" != 0 ]; then
    echo "gpu-check --dry-run: FAILED"
    exit 1
  fi
  echo "gpu-check --dry-run: OK"
  exit 0
fi

# ---- the real run: a GPU first ----------------------------------------------------------------------------------
no_gpu() {
  echo "gpu-check: no CUDA GPU visible ($1); this check needs one. On this machine, run scripts/gpu-check.sh --dry-run" >&2
  exit 2
}
if [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ] || [ "${CUDA_VISIBLE_DEVICES-}" = "-1" ]; then
  no_gpu "CUDA_VISIBLE_DEVICES is empty"
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  no_gpu "nvidia-smi lists none"
fi
[ -x "$PY" ] || { echo "gpu-check: $PY is not an executable Python (--python)" >&2; exit 2; }
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || no_gpu "torch in $PY sees none"

mkdir -p "$OUT/steps" "$OUT/logs" "$OUT/work"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/steps/*.json "$OUT"/steps/*.exit
PLAN=$("$PY" -m dpo_dist.bench.gpu_check plan --shell --out "$OUT" --python "$PY" --recipe "$RECIPE") || {
  echo "gpu-check: cannot build the plan; run scripts/gpu-check.sh --dry-run" >&2; exit 2; }
total=$(printf '%s\n' "$PLAN" | wc -l)
i=0
started=$(date +%s)
while IFS=$'\t' read -r name limit cmd; do
  i=$((i + 1))
  if [[ ",$SKIP," == *",$name,"* ]]; then
    printf '{"skipped": "--skip %s"}\n' "$name" > "$OUT/steps/$name.exit"
    echo "[gpu-check] $i/$total $name: skipped"
    continue
  fi
  echo "[gpu-check] $i/$total $name (timeout ${limit} s) ..."
  t0=$(date +%s.%N)
  # timeout signals the step's whole process group (launchers and ranks included); KILL 10 s after TERM
  timeout -k 10 "$limit" bash -c "$cmd" > "$OUT/logs/$name.log" 2>&1 < /dev/null
  rc=$?
  seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '{"rc": %d, "seconds": %s, "timeout_s": %d}\n' "$rc" "$seconds" "$limit" > "$OUT/steps/$name.exit"
  note=$(grep '^\[gpu-check\]' "$OUT/logs/$name.log" | tail -n 1 || true)
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out after ${limit} s"
  echo "[gpu-check]   rc $rc, ${seconds} s ${note:+: ${note#\[gpu-check\] }}"
done <<< "$PLAN"
echo "[gpu-check] all steps done in $(( $(date +%s) - started )) s"
"$PY" -m dpo_dist.bench.gpu_check report --out "$OUT"
