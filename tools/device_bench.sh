#!/usr/bin/env bash
# The accelerator benchmark on a lent GPU machine, in one go (docs/benchmarks.md, "Accelerator benchmark").
#
#   bash tools/device_bench.sh [extra flags for `tools/benchmark.py accelerator`]
#
# Run from anywhere; it works in the repository root. It installs nothing from the network (the GPU
# machine has none): stmoe is imported from the checkout through PYTHONPATH, and jax/flax/optax/numpy
# come from the machine's python3. stmoe's modules import gin at module level; gin-config is used if
# installed, else from a carried wheel in .whl/ (gin_config-*.whl, installed with --no-index into
# /tmp), else tools/gin_shim stands in (the benchmark builds its configs in Python and parses no gin).
#
# Writes into $OUT (default: out/device_bench/): accelerator.json (rewritten after every measured piece, so
# a timeout still leaves what finished), accelerator.log, nvidia_smi.csv and device_bench.log.
# The benchmark budgets itself 420 s; `timeout` ends it at BENCH_TIMEOUT_S (480 s = 8 minutes) regardless.
# Exit status: the benchmark's (124 or 137 when the timeout ended it).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-$ROOT/out/device_bench}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LIMIT_S="${BENCH_TIMEOUT_S:-480}"
LOG="$OUT/device_bench.log"

log() { echo "[device_bench] $*" | tee -a "$LOG"; }

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# One process owns the GPU: let XLA's allocator take 90% of it (jax's default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

log "started $(date -u +%FT%TZ) in $ROOT, python: $(command -v "$PY"), timeout ${LIMIT_S}s, OUT=$OUT"

if "$PY" -c "import gin" >/dev/null 2>&1; then
  log "gin-config: installed"
elif compgen -G "$ROOT/.whl/gin_config-*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/stmoe_site \
      "$ROOT"/.whl/gin_config-*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="/tmp/stmoe_site:$PYTHONPATH"
    log "gin-config: installed from the carried wheel into /tmp/stmoe_site"
  else
    export PYTHONPATH="$ROOT/tools/gin_shim:$PYTHONPATH"
    log "gin-config: the carried wheel did not install; using tools/gin_shim"
  fi
else
  export PYTHONPATH="$ROOT/tools/gin_shim:$PYTHONPATH"
  log "gin-config: not installed and no wheel in .whl/; using tools/gin_shim"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  fields=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw
  nvidia-smi --query-gpu="$fields" --format=csv >"$OUT/nvidia_smi.csv" 2>&1 || true
  log "GPU: $(tail -n +2 "$OUT/nvidia_smi.csv" | head -1)"
else
  log "no nvidia-smi on this machine"
fi

timeout -k 20 "$LIMIT_S" "$PY" tools/benchmark.py accelerator --json "$OUT/accelerator.json" "$@" 2>&1 \
  | tee "$OUT/accelerator.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  log "the benchmark hit the ${LIMIT_S}s timeout; $OUT/accelerator.json holds the pieces that finished"
fi
log "finished $(date -u +%FT%TZ), exit status $rc"
exit "$rc"
