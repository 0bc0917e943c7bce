#!/usr/bin/env bash
# The GPU check: every torch-cuda gate on this machine's NVIDIA GPU in one command, about
# 4-5 minutes on an H200 (see README "GPU engines"). Writes under OUT_DIR (default: $OUT, else
# gpu-check/ in the project): backends.txt, tests.log, gates.log, benchmark.json, results/, report.html,
# summary.md, and where a loop test failed sweep.log (the loop under other decode settings);
# prints the summary table. Exits non-zero when any step failed.
#
#   tools/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=$(realpath -m "${1:-${OUT:-$(dirname "$0")/../gpu-check}}")  # a relative OUT_DIR: the caller's
cd "$(dirname "$0")/.."
mkdir -p "$out"
# rtmbench's own default, spelled out for the sweep below; not under $out, which a device call ships back
export RTMBENCH_CACHE_DIR="${RTMBENCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtmbench}" PYTHONUNBUFFERED=1
status=0
step() {  # step LOG COMMAND...: run it, keep its output in $out/LOG, remember a failure
  local log=$1; shift
  echo "== $* ($(date -u +%H:%M:%S))"
  "$@" 2>&1 | tee "$out/$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "== FAILED: $*"; status=1; }
}

step backends.txt python3 -m rtmbench backends
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: no NVIDIA GPU visible to torch; nothing to check" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv \
  | tee "$out/nvidia-smi.csv"

# The GPU paths of the harness's own tests: conformance of torch-cuda at batch 1/7/32 against
# the CPU reference, and the on-device postprocess against the NumPy reference.
step tests.log python3 -m pytest -p no:cacheprovider -q tests/test_backends.py tests/test_postprocess.py \
  tests/test_torch_cuda.py -k "(torch-cuda and not compile) or postprocess or nms or torch_cuda"

# The gates: accuracy, fidelity and perf for every precision, then the compiled engine (fp16);
# the loop beside an accelerator stand-in (the host pipeline alone) runs in the first only.
gates=(python3 -m pytest benchmarks -p no:cacheprovider -q -s --results-dir "$out/results")
step gates.log "${gates[@]}" -m "accuracy or perf or fidelity" --backend torch-cuda --precision fp32 \
  --precision fp16 --precision bf16 --benchmark-json "$out/benchmark.json"
step report.log python3 -m rtmbench report "$out/results" --html "$out/report.html" --markdown "$out/summary.md"
# torch.compile takes about a minute per precision: bounded so the check fits a device lease.
step gates-compile.log timeout -k 10 "${COMPILE_TIMEOUT:-240}" "${gates[@]}" -m "accuracy or perf" \
  -k "not beside_an_accelerator" --backend torch-cuda-compile --precision fp16 \
  --benchmark-json "$out/benchmark-compile.json"
step report-final.log python3 -m rtmbench report "$out/results" --html "$out/report.html" --markdown "$out/summary.md"
cat "$out/summary.md"
# Last, being a diagnosis and not a gate (a lease that runs out loses only this): where a
# detection loop test failed, the accuracy loop (fp16, the 500-image split) under other decode
# settings, so that one run also says which does best (about 10 s each, at most 45).
if grep -q "FAILED.*test_detection_loop" "$out/gates.log"; then
  data=$(ls -d "$RTMBENCH_CACHE_DIR"/datasets/*/synthetic-seed7-500 | head -1)
  for decode in "processes --workers 8" "processes --workers 11" "processes --workers 14" "threads"; do
    json="$out/sweep-${decode// /-}.json"
    rm -f "$json"
    timeout -k 5 45 python3 -m rtmbench eval --model rtmdet-nano-synthetic --backend torch-cuda --precision fp16 \
      --data-root "$data" --decode-in $decode --json "$json" 2>&1 | tail -1 | tee -a "$out/sweep.log"
    [ -f "$json" ] && python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(f'  {sys.argv[2]}:', ', '.join(
f'{part} {k} {v:.3f} s' for part in ('batcher_s', 'engine_waited_s') for k, v in r[part].items()))" \
      "$json" "$decode" | tee -a "$out/sweep.log"
  done
fi
exit $status
