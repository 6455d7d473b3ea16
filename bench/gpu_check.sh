#!/usr/bin/env bash
# The GPU paths of issue 14 in one run (< 8 minutes on one GPU), one table at the end:
#   1. bf16 SAE training on the default world (model.dtype=bfloat16, trainer.precision=bf16-mixed);
#   2. bench/scale.py at two widths (llama3-8b shape, 1024 and 4096, bf16, every method);
#   3. a 100-edit MicroEdit stream on the GPU through the edit job;
#   4. the tests marked `gpu` (bf16 streams on CUDA, a model split over cuda:0 and the CPU).
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (default runs/gpu_check; logs and outputs go there)
# Every step runs even when an earlier one failed; the exit code is 1 when any step failed.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
declare -a NAMES STATUS SECS NOTES

step() {  # step NAME NOTE_COMMAND -- COMMAND...
  local name=$1 note_cmd=$2; shift 3
  local log="$OUT/$name.log" begin end rc
  echo "[gpu_check] $name: $*" >&2
  begin=$(date +%s)
  "$@" >"$log" 2>&1
  rc=$?
  end=$(date +%s)
  NAMES+=("$name")
  STATUS+=("$([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc, see $log)")")
  SECS+=("$((end - begin))")
  NOTES+=("$(eval "$note_cmd" 2>/dev/null | tr '\n' ' ' | cut -c1-160)")
}

$PY - <<'EOF' || { echo "[gpu_check] no CUDA device: nothing to check" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")

step sae_bf16 "grep -ho 'fvu[^,]*' $OUT/sae_bf16.log | tail -1" -- \
  $PY train_sae.py model.dtype=bfloat16 trainer.precision=bf16-mixed trainer.accelerator=gpu trainer.devices=1 \
  threads=4 logger=csv trainer.enable_progress_bar=false output_dir="$OUT/sae" export_dir="$OUT/sae/export"

step scale_bench "echo \$(grep -c 'error:' $OUT/scale_gpu.md) failing cells, table below" -- \
  $PY bench/scale.py --widths 1024,4096 --dtype bfloat16 --device cuda --edits 3 --steps 8 --corpus-lines 512 --sae 32768,65536 \
  --out "$OUT/scale_gpu.md"

step microedit_100 "$PY -c \"import json; r=json.load(open('$OUT/microedit/results.json'))['rows'][-1]; print({k: round(v, 3) for k, v in r['final-state'].items() if isinstance(v, float)})\"" -- \
  $PY -m lightning_edit run edit config=microedit.yaml model.device=cuda data.limit=100 eval.checkpoints=[100] \
  logger=csv trainer.enable_progress_bar=false output_dir="$OUT/microedit"

step gpu_tests "tail -1 $OUT/gpu_tests.log" -- \
  $PY -m pytest -q -m gpu -p no:cacheprovider tests

echo
echo "GPU check on $GPU ($(date -u +%FT%TZ))"
echo
echo "| step | status | seconds | result |"
echo "| --- | --- | ---: | --- |"
failed=0
for i in "${!NAMES[@]}"; do
  echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]} |"
  [ "${STATUS[$i]}" = ok ] || failed=1
done
echo
[ -f "$OUT/scale_gpu.md" ] && cat "$OUT/scale_gpu.md"
exit $failed
