#!/usr/bin/env bash
# Everything goose checks on one CUDA GPU, in one go (one call of a GPU machine lent for minutes):
#
#   1. make test-gpu   tests/gpu: local_pipeline on the GPU equal to the plain run, the stream
#                      race tests, the same under TORCH_CUDA_SANITIZER=1, the composed API over
#                      NCCL under torchrun, the memory profiler's allocator path
#   2. make bench-gpu  tokens/s, peak memory and MFU, 🤗 beside goose's local pipeline; by default
#                      GPT-2 124M in TF32 only: issue 10's comparisons (goose x1 M=4 against 🤗
#                      4-step accumulation, goose checkpoint=always against 🤗's gradient
#                      checkpointing) in about a minute
#
# Run from the repository root:  bash benchmarks/gpu_check.sh
#   PYTHON=...           a python whose torch sees CUDA (default: python3 if it does, else .venv's)
#   BENCH_GPU_ARGS=...   options of python -m benchmarks.gpu (default: --model gpt2-124m --precision tf32;
#                        '' runs every model and precision, ~10 min on an H200)
#   3. goose plan      the ~1B Llama of bench-gpu (its config only) at 8 GPUs in every mode the
#                      plan models: ZeRO-3, recompute blocks / selective, interleaved 1F1B, ZB-H1,
#                      ZBV, bf16 and fp16, with step time and MFU on the preset of this GPU (h100
#                      unless nvidia-smi says H200): the predictions a multi-GPU run is to be held
#                      against (plan.txt; the plan needs no GPU, so a CPU machine prints the same:
#                      it runs on the CPU while parts 1 and 2 use the GPU)
#
#   SKIP_TESTS=1, SKIP_BENCH=1, SKIP_PLAN=1   leave a part out
#
# The logs, the environment and the benchmark's records go to $OUT when it is set (the folder a
# device machine sends back), else to benchmarks/out/gpu_check/. A full-size bench run also
# appends to benchmarks/gpu_results.json and rewrites benchmarks/gpu.md (copied there too).
# Exit status: the tests' (the benchmark records a failing case as a row and goes on).
set -u -o pipefail
cd "$(dirname "$0")/.."

# With a python given or found, the Makefile's targets run with it (GPU_PYTHON); else they build
# and use .venv as always (its torch is the pinned CPU wheel unless a CUDA build was installed).
if [ -z "${PYTHON:-}" ] && python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PYTHON=python3
fi
if [ -z "${PYTHON:-}" ]; then
    make --no-print-directory .venv/.installed || exit
    PYTHON=.venv/bin/python
    GPU_PYTHON=
else
    GPU_PYTHON=$PYTHON
fi
OUT_DIR=${OUT:-benchmarks/out/gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
BENCH_GPU_ARGS=${BENCH_GPU_ARGS---model gpt2-124m --precision tf32}

{
    date -u
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not installed"; fi
    "$PYTHON" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], sys.executable);
print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count(),
      "NCCL", torch.cuda.nccl.version() if torch.cuda.is_available() else None);
print("transformers", transformers.__version__)'
    git log -1 --oneline 2>/dev/null || true
} 2>&1 | tee "$OUT_DIR/environment.txt"

if [ -z "${SKIP_PLAN:-}" ]; then
    echo "== goose plan: llama-1b at 8 GPUs, every mode the plan models (in the background: plan.txt)"
    hw=h100
    if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q H200; then hw=h200; fi
    plan() {  # python -m goose_core.plan on the saved config, the layout in "$@"
        echo "-- goose plan $*"
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m goose_core.plan --model "$OUT_DIR/llama-1b" \
            --batch-size 32 --seq-len 2048 --hardware "$hw" "$@" 2>&1
    }
    {
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c 'import sys; from benchmarks.gpu import FULL
FULL["llama-1b"].config().save_pretrained(sys.argv[1])' "$OUT_DIR/llama-1b"
        plan --dp 8 --zero 3 --dtype bf16
        plan --tp 2 --dp 4 --zero 3 --dtype fp16
        plan --pp 2 --dp 4 --microbatches 8 --schedule 1f1b --recompute blocks --dtype bf16
        plan --pp 2 --dp 4 --microbatches 8 --schedule 1f1b --recompute selective --dtype bf16
        plan --tp 2 --pp 2 --dp 2 --microbatches 8 --schedule interleaved-1f1b --dtype bf16
        plan --tp 2 --pp 2 --dp 2 --microbatches 8 --schedule zb-h1 --dtype bf16 --zero
        plan --tp 2 --pp 2 --dp 2 --microbatches 8 --schedule zbv --dtype bf16
    } > "$OUT_DIR/plan.txt" &  # on the CPU, beside the GPU's work; shown at the end
    plan_pid=$!
fi

status=0
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== make test-gpu ($PYTHON)"
    start=$SECONDS
    if command -v make >/dev/null; then
        make --no-print-directory test-gpu GPU_PYTHON="$GPU_PYTHON" 2>&1 | tee "$OUT_DIR/test-gpu.log"
    else  # the same recipe as the Makefile's
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q -rs -m gpu tests/gpu 2>&1 \
            | tee "$OUT_DIR/test-gpu.log"
    fi
    status=$?
    echo "== make test-gpu: exit $status after $((SECONDS - start)) s"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
    echo "== make bench-gpu ($PYTHON -m benchmarks.gpu $BENCH_GPU_ARGS)"
    start=$SECONDS
    if command -v make >/dev/null; then
        make --no-print-directory bench-gpu GPU_PYTHON="$PYTHON" BENCH_GPU_ARGS="$BENCH_GPU_ARGS" 2>&1 \
            | tee "$OUT_DIR/bench-gpu.log"
    else  # the same recipe as the Makefile's
        # shellcheck disable=SC2086  # the options are words
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m benchmarks.gpu $BENCH_GPU_ARGS 2>&1 \
            | tee "$OUT_DIR/bench-gpu.log"
    fi
    echo "== make bench-gpu: exit $? after $((SECONDS - start)) s"
    if [ -f benchmarks/gpu_results.json ]; then cp benchmarks/gpu_results.json benchmarks/gpu.md "$OUT_DIR/"; fi
fi

if [ -n "${plan_pid:-}" ]; then
    wait "$plan_pid"
    echo "== goose plan (predictions only; they need no GPU):"
    cat "$OUT_DIR/plan.txt"
fi
if [ -n "${plan_pid:-}" ]; then
    wait "$plan_pid"
    echo "== goose plan (predictions only; they need no GPU):"
    cat "$OUT_DIR/plan.txt"
fi
exit $status
