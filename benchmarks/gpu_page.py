"""The GPU page (benchmarks/gpu.md): ``make bench-gpu``'s records in gpu_results.json, rendered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.paired import verdict

__all__ = ["GPU_RESULTS", "GPU_MD", "append_and_publish", "write_gpu_page", "versus_accumulation"]

GPU_RESULTS = Path(__file__).with_name("gpu_results.json")
GPU_MD = Path(__file__).with_name("gpu.md")

METHOD = """\
# GPU: throughput, memory and MFU of training steps

`make bench-gpu` (or `python -m benchmarks.gpu`) trains on one CUDA GPU and writes this page
from `benchmarks/gpu_results.json`. Without CUDA it says why and exits 0: the project's
environment pins a CPU build of torch, so on a GPU machine install a CUDA build into it first
(`.venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu128`).
`--model gpt2-124m|llama-1b` and `--precision tf32|bf16` (each repeatable) run a part;
`--device cpu --tiny` runs every case on tiny configs in seconds, a smoke test of the script
whose numbers mean nothing (`tests/test_bench_gpu.py` runs it). On a GPU machine lent for
minutes, `bash benchmarks/gpu_check.sh` runs `make test-gpu` and then this benchmark (GPT-2 124M
in TF32 unless `BENCH_GPU_ARGS` says otherwise) with the python that has a CUDA torch, and
keeps the logs, the environment and these records in `$OUT`.

## What runs

GPT-2 124M (1024 tokens a sequence, 8 sequences a micro-batch) and a 1.24B Llama of Llama 3.2
1B's shape (16 layers, 32 query / 8 key-value heads, vocab 128256, tied embeddings; 2048 tokens,
4 a micro-batch), 4 micro-batches a step: 32768 tokens. Each case trains a fresh fp32 model on
the same batch with AdamW (fused), in two precisions: **tf32** (fp32 weights and activations,
matmuls on TF32 tensor cores) and **bf16** (the forward under `torch.autocast(bfloat16)`, the
backward outside it).

| case | what trains |
|---|---|
| 🤗 one batch | the whole batch in one forward and backward |
| 🤗 accumulation | the 4 micro-batches one after another, gradients accumulated (🤗's `num_items_in_batch`) |
| 🤗 accumulation, gradient checkpointing | the same with 🤗's non-reentrant checkpointing of every layer |
| goose local_pipeline x1 / x2, checkpoint *mode* | `goose_core.pipeline.local_pipeline` over the same 4 micro-batches, one partition or two on the same GPU, checkpoint `never`, `except_last` or `always` |
| goose local_pipeline x1, checkpoint blocks / selective | one partition, `recompute="blocks"` (each block replayed, head and loss kept, as 🤗's checkpointing) or `"selective"` (matmul outputs kept, the rest replayed) |
| goose local_pipeline x1 / x2 1F1B, checkpoint *mode* | the same in 1F1B's order (`schedule="1f1b"`: at most p micro-batches' activations alive where GPipe keeps all 4), in runs where `local_pipeline` takes `schedule` |

## How it is measured

- **Time**: 3 warm-up steps (allocator growth, cuBLAS heuristics), then 10 steps with a CUDA
  event recorded at every step boundary and one synchronisation at the end (kernels run
  asynchronously: a host clock would time the launches). The median step is reported,
  with its quartiles; tokens/s = tokens a step / median step.
- **Peak memory**: `torch.cuda.max_memory_allocated` since a reset just before the case
  builds its model: weights, gradients, AdamW state and activations. Each case runs alone.
- **Model FLOPs a step** = tokens x (6 N + 12 L d T): N the weights that multiply
  activations (every `nn.Linear`/`Conv1D`, the LM head once even when tied), L layers,
  d = heads x head dim, T the sequence length. 6 N is the forward's 2 and the backward's 4
  FLOPs a weight and token; 12 L d T is attention's Q Kᵀ and A V (2 T d each per token and
  layer, x3 with the backward), counted in full, without halving for the causal mask, as
  PaLM and torchtitan count. The formula equals `torch.utils.flop_counter` exactly on a
  tiny GPT-2 and Llama with eager attention (`tests/test_bench_gpu.py`).
- **MFU** = model FLOPs a step / median step time / peak FLOP/s, the peak *measured in the
  same run* by an 8192³ matmul in the case's precision (TF32 or bf16), so no datasheet is
  needed. Against a datasheet peak the MFU would be lower by the matmul's own efficiency.
  Recomputation under checkpointing is not counted: it costs MFU, which is what it should show.
- **goose / 🤗 accumulation**: a goose case's median step over 🤗 accumulation's with the same
  checkpointing (`never` beside none; `except_last` and `always` beside gradient
  checkpointing). The cases run one after another, not interleaved (each needs the GPU to
  itself for its peak memory), so the interval is the conservative unpaired one:
  goose's lower quartile over 🤗's upper, to goose's upper over 🤗's lower. As on the CPU
  page, an interval holding 1.0 reads "no difference measured".

Targets (issue 15): goose within 1.03x of 🤗 accumulation at the same micro-batches; bf16 MFU
of the 1B config at least 45% with activation checkpointing on one H200.

Checkpointed cells recompute under the forward's autocast state (the mixed-precision issue,
13, fixed this), so the bf16 goose rows with checkpoint `except_last` or `always` recompute in
bf16 as 🤗's checkpointing does.
"""


def _history() -> list[dict[str, Any]]:
    return json.loads(GPU_RESULTS.read_text()) if GPU_RESULTS.exists() else []


def append_and_publish(rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to gpu_results.json and rewrite gpu.md from the whole history."""
    history = _history() + rows
    GPU_RESULTS.write_text(json.dumps(history, indent=1, ensure_ascii=False) + "\n")
    write_gpu_page(history)


def versus_accumulation(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A goose row's median step over 🤗 accumulation's with the same checkpointing, with the
    unpaired quartile interval and its verdict; "" for other rows or when either did not run."""
    if row["runner"] != "goose" or row["status"] != "ok":
        return ""
    wanted = "never" if row["checkpoint"] == "never" else "always"
    peer = next((r for r in rows if r["runner"] == "hf-accumulate" and r["checkpoint"] == wanted
                 and r["model"] == row["model"] and r["precision"] == row["precision"] and r["status"] == "ok"), None)
    if peer is None:
        return ""
    low, high = row["step_q1_s"] / peer["step_q3_s"], row["step_q3_s"] / peer["step_q1_s"]
    return f"{row['step_s'] / peer['step_s']:.3f} [{low:.3f}, {high:.3f}] {verdict(low, high)}"


def _row(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = f"| {r['model']} | {r['precision']} | {r['case']} |"
    if r["status"] != "ok":
        return head + f" {r['status']} | | | | |"
    memory = r["peak_memory_bytes"]
    return (head + f" {r['tokens_per_s']:,.0f} | {r['step_s'] * 1e3:.1f} [{r['step_q1_s'] * 1e3:.1f}, "
            f"{r['step_q3_s'] * 1e3:.1f}] | {'—' if memory is None else f'{memory / 2**30:.1f}'} | "
            f"{r['mfu']:.1%} | {versus_accumulation(r, rows)} |")


def write_gpu_page(history: list[dict[str, Any]], path: Path = GPU_MD) -> None:
    """gpu.md: the method, then the newest run's table, its measured peaks and its environment."""
    if not history:
        body = "## Results\n\nNo GPU run recorded yet: run `make bench-gpu` on a machine with a CUDA GPU.\n"
    else:
        run = max(r["run"] for r in history)
        rows = [r for r in history if r["run"] == run]
        env = rows[-1]["environment"]
        peaks = {r["precision"]: r["peak_flops"] for r in rows}
        body = (f"## Results of {run}\n\n"
                f"On {env.get('gpu')} (CUDA {env.get('cuda')}, torch {env.get('torch')}, transformers "
                f"{env.get('transformers')}); host {env.get('cpu')}, {env.get('cores')} cores. Measured peaks: "
                + ", ".join(f"{p} {v / 1e12:.0f} TFLOP/s" for p, v in peaks.items()) + ".\n\n"
                "| model | precision | case | tokens/s | step ms [quartiles] | peak GiB | MFU | "
                "goose / 🤗 accumulation [interval] |\n|---|---|---|---|---|---|---|---|\n"
                + "\n".join(_row(r, rows) for r in rows) + "\n")
    path.write_text(METHOD + "\n" + body, encoding="utf-8")
