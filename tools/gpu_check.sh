#!/usr/bin/env bash
# One GPU check, for the day a CUDA device is lent (target: under 8 minutes on one GPU, nothing downloaded):
#   1. pytest -m gpu                       the GPU-marked tests
#   2. bench.py kernels                    the Triton FP8 kernels against their references
#   3. 20 `tiny` steps on CUDA: bf16, fp8-triton and fp8-emulated; fp8-triton's last loss must equal
#      fp8-emulated's (same numerics, same device) to 1e-3 relative
#   4. generation on CUDA: cached decode (absorbed and naive) equals the full forward, last position, 1e-4
# It prints one table (check | result | seconds) and exits non-zero if any check failed.
#   bash tools/gpu_check.sh            on a GPU machine
#   GPU_CHECK_SMOKE=1 bash tools/gpu_check.sh   on CPU: the same steps at toy sizes (kernels in Triton's
#                                      interpreter, 2 training steps, no fp8-triton training), to find a
#                                      broken script before GPU time is spent on it
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=$(mktemp -d)
SMOKE=${GPU_CHECK_SMOKE:-0}
ITERS=20; BACKENDS="bf16 fp8-triton fp8-emulated"; KERNELS=""
if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
  ITERS=2; BACKENDS="bf16 fp8-emulated"; KERNELS="--smoke"
elif ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU here (set GPU_CHECK_SMOKE=1 for the CPU smoke run)" >&2
  exit 2
fi
ROWS=(); FAILED=0

check() {  # check NAME COMMAND...: run it, keep its log, add a row
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then result=ok; else result="FAILED (log: $OUT/$name.log)"; FAILED=1; fi
  ROWS+=("| $name | $result | $((SECONDS - t0)) |")
}

check pytest-gpu bash -c "$PY -m pytest -q -m gpu tests; rc=\$?; [ \$rc -eq 0 ] || [ \$rc -eq 5 ]"  # 5: none collected
check bench-kernels $PY tools/bench.py kernels $KERNELS --out "$OUT/kernels.json"
for b in $BACKENDS; do
  check "train-$b" $PY recipes/v3_pretrain.py --config tiny --train-iters "$ITERS" --precision "$b" --seed 1 \
    --micro-batch-size 2 --global-batch-size 2 --seq-length 128 --save "$OUT/ckpt-$b" --log-interval 1 \
    --log-json "$OUT/train-$b.jsonl"
done
if [ "$SMOKE" != 1 ]; then
  check fp8-triton-equals-emulated $PY - "$OUT/train-fp8-triton.jsonl" "$OUT/train-fp8-emulated.jsonl" <<'PYEOF'
import json, sys
last = [json.loads(open(p).read().splitlines()[-1])["loss"] for p in sys.argv[1:]]
print(last)
sys.exit(0 if abs(last[0] - last[1]) <= 1e-3 * abs(last[1]) else 1)
PYEOF
fi
check generate-cached-equals-full $PY - <<'PYEOF'
import torch
from moelib import ModelConfig, YarnConfig
from moelib.inference.cache import KVCache
from moelib.model import build_model

torch.backends.cuda.matmul.allow_tf32 = False
device = "cuda" if torch.cuda.is_available() else "cpu"
cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2, rope_scaling=YarnConfig(factor=4.0,
                              original_max_position_embeddings=256))
model = build_model(cfg, "fp32", seed=0, device=device).eval()
tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
with torch.no_grad():
    full = model(tokens)
    for absorb in (True, False):
        cache = KVCache(cfg.num_hidden_layers, cfg, 2, 48, absorb=absorb, device=device)
        end = 32
        h = model.cached_hidden_states(tokens[:, :end], cache)
        while True:
            ours, ref = model.lm_head(h[:, -1]), full[:, end - 1]
            err = float((ours - ref).norm() / ref.norm())
            assert err <= 1e-4, (absorb, end, err)
            if end == 48:
                break
            h, end = model.cached_hidden_states(tokens[:, end:end + 1], cache), end + 1
print("ok on", device)
PYEOF

echo "| check | result | seconds |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
[ "$SMOKE" = 1 ] && echo "(CPU smoke run: toy sizes, no GPU numbers)"
exit $FAILED
