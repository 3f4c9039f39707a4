#!/usr/bin/env bash
# First contact with a GPU, in one command from the checkout's root (about 6 minutes on one H100):
#   bash bench/gpu_smoke.sh              # the CUDA build of torch must be installed already
#   bash bench/gpu_smoke.sh --dry-run    # every step on the CPU with tiny sizes: checks the plumbing (CI)
# Steps: the machine; the extension built with its CUDA kernels; the CUDA kernel tests against the
# float64 reference (and the nvcc compile check); the kernel bench against torch SDPA (and flash-attn /
# mamba-ssm where importable); 50 training steps of recipes/quickstart.yaml and of the bfloat16 hybrid
# recipes/gpu-smoke-hybrid.yaml, each reported as tokens/s, MFU and peak memory from its metrics.jsonl.
# Run directories go under $SMOKE_DIR (default: a new temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_smoke.sh [--dry-run]" >&2; exit 2 ;;
esac
out=${SMOKE_DIR:-$(mktemp -d)}
mkdir -p "$out"
step() { printf '\n== %s (%ds)\n' "$1" "$SECONDS"; }

step "machine"
python - "$dry_run" <<'EOF'
import sys, torch
dry = sys.argv[1] == "1"
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
if not dry and not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA GPU visible to torch: install the CUDA build of torch, or pass --dry-run")
EOF
if (( ! dry_run )); then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; fi

step "build the extension"
if (( dry_run )); then
  python -c "import torch, longtrain.kernels._C; print('extension importable (not rebuilt in a dry run)')"
else
  # One architecture, the GPU's own: the build takes a third of the time of torch's default list.
  arch=$(python -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")
  TORCH_CUDA_ARCH_LIST="$arch" pip install --no-build-isolation --no-deps -e . -q
  python -c "import torch, longtrain.kernels._C; print('built with CUDA kernels for sm', '$arch')"
fi

step "CUDA kernel tests"
if (( dry_run )); then
  python -m pytest -q --collect-only tests/test_kernels_cuda.py tests/test_kernels_nvcc.py | tail -1
else
  python -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels_nvcc.py
fi

step "kernel bench"
if (( dry_run )); then
  python bench/gpu_kernels.py --device cpu --quick --repeats 1
else
  python bench/gpu_kernels.py
fi

train() {  # recipe, run name, overrides...
  local recipe=$1 name=$2
  shift 2
  step "train $recipe"
  longtrain train "$recipe" run.dir="$out/$name" --overwrite "$@"
  python - "$out/$name/metrics.jsonl" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
last = [r for r in records if "tokens_per_s" in r][-1]
print(f"summary: step {last['step']} | {last['tokens_per_s']:,.0f} tokens/s | MFU {last['mfu']:.1%} | "
      f"peak memory {last['peak_memory_bytes'] / 2**30:.2f} GiB | loss {last['loss']:.3f}")
EOF
}

if (( dry_run )); then
  tiny=(train.steps=2 train.log_interval=1 train.eval_interval=2 train.eval_batches=1 train.sample_tokens=0
        train.micro_batch_size=2 data.max_bytes=300000 data.seq_len=64 data.tokenizer.vocab_size=512
        model.vocab_size=512 model.d_model=32 model.n_heads=2 model.n_kv_heads=1 checkpoint.interval=2)
  train recipes/quickstart.yaml quickstart "${tiny[@]}"
  train recipes/gpu-smoke-hybrid.yaml hybrid "${tiny[@]}" model.pattern=MFAF
else
  train recipes/quickstart.yaml quickstart train.steps=50 train.sample_tokens=0
  train recipes/gpu-smoke-hybrid.yaml hybrid
fi
printf '\ngpu_smoke: done in %ds; run directories under %s\n' "$SECONDS" "$out"
