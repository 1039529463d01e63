"""``make bench-gpu``: tokens/s, peak memory and MFU of real training steps on one GPU, 🤗 beside goose.

For GPT-2 124M and a ~1B Llama (Llama 3.2 1B's shape), in TF32 and under bf16 autocast, each
case trains the same fresh model on the same batch of ``micro_batch x microbatches`` sequences
with AdamW (forward, backward, optimizer step)::

    hf-batch          🤗, the whole batch in one forward
    hf-accumulate     🤗, the same micro-batches one after another, gradients accumulated
                      (checkpoint never, or always = 🤗's gradient checkpointing of every layer)
    goose-1 / -2      goose's local_pipeline, 1 partition, or 2 on the same device, GPipe over
                      the same micro-batches, in each checkpoint mode (never, except_last, always);
                      and the same in 1F1B's order once local_pipeline takes schedule="1f1b";
                      goose-1 recompute="blocks" and "selective" (the blocks only, head and loss kept)

Timing: ``--warmup`` steps first (allocator growth, cuBLAS heuristics), then ``--steps`` steps
with a CUDA event at each step boundary and one synchronisation at the end; the median step
is reported with its quartiles. Peak memory is ``torch.cuda.max_memory_allocated`` since a reset
just before the warm-up (weights, gradients, optimizer state and activations). MFU divides the
model FLOPs of a step (``benchmarks.flops``) by the median step time and by the peak FLOP/s of
a large matmul measured at the start of the run in the same precision.

Beside the cases that hold one micro-batch's activations at a time with nothing recomputed (🤗
accumulation, goose x1 checkpoint never), each TF32 row carries ``goose plan``'s prediction for
that one-device layout, made from the config alone before the run: ``plan_peak_bytes``
(parameters, gradients, AdamW state and the saved activations of one micro-batch) and
``plan_step_s`` (the plan's counted FLOPs at the measured peak; no overhead, so a lower bound).
Under bf16 autocast the plan has no model of the casts and says nothing.

Without CUDA it prints why and exits 0. ``--device cpu --tiny`` runs every case on tiny configs
in seconds (a smoke test of this script; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from benchmarks.environment import environment, load_average
from benchmarks.gpu_page import append_and_publish
from benchmarks.flops import matmul_parameters, mfu, training_flops
from benchmarks.measure import (PRECISIONS, StepTimer, autocast, measure_peak_flops, peak_memory,
                                reset_peak_memory, synchronize, tf32)
from goose_core.pipeline import BLOCK_MODES, local_pipeline
from goose_core.plan import Layout, predict

__all__ = ["Shape", "Case", "CASES", "FULL", "TINY", "run_case", "plan", "main"]

CHECKPOINT_MODES = ("never", "except_last", "always")  # goose's, see goose_core.engine.recompute
#: n of the n x n x n matmul that measures the peak FLOP/s: 8192 (1.1 TFLOP a matmul) saturates
#: a datacenter GPU; 128 keeps the tiny smoke run quick.
PEAK_MATMUL, TINY_PEAK_MATMUL = 8192, 128


@dataclass(frozen=True)
class Shape:
    """A model config and the batch it trains on: ``micro_batch x microbatches`` sequences."""

    config: Callable[[], PretrainedConfig]
    seq_len: int
    micro_batch: int
    microbatches: int

    @property
    def batch_size(self) -> int:
        return self.micro_batch * self.microbatches


def _gpt2(**kw: Any) -> Callable[[], PretrainedConfig]:
    # No dropout: a pretraining setting (nanoGPT's), and the same work in every case.
    return lambda: GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                              attn_implementation="sdpa", **kw)


def _llama(**kw: Any) -> Callable[[], PretrainedConfig]:
    return lambda: LlamaConfig(tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa", **kw)


#: GPT-2 small (124M) at its context of 1024; Llama 3.2 1B's shape (1.24B parameters, 16 layers,
#: GQA 32/8 heads, vocab 128256, tied embeddings) at 2048. 32768 tokens a step in both.
FULL = {
    "gpt2-124m": Shape(_gpt2(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
                       seq_len=1024, micro_batch=8, microbatches=4),
    "llama-1b": Shape(_llama(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                             max_position_embeddings=8192, rope_theta=500000.0),
                      seq_len=2048, micro_batch=4, microbatches=4),
}
#: The same families, small enough that every case runs in well under a second on a CPU.
TINY = {
    "gpt2-124m": Shape(_gpt2(n_positions=64, n_embd=32, n_layer=2, n_head=4, vocab_size=128),
                       seq_len=16, micro_batch=2, microbatches=2),
    "llama-1b": Shape(_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=64),
                      seq_len=16, micro_batch=2, microbatches=2),
}


@dataclass(frozen=True)
class Case:
    """What trains: ``runner`` is hf-batch, hf-accumulate or goose (``partitions`` on one device,
    in ``schedule``'s order)."""

    runner: str
    checkpoint: str = "never"
    partitions: int = 1
    schedule: str = "gpipe"

    @property
    def name(self) -> str:
        if self.runner == "goose":
            order = "" if self.schedule == "gpipe" else f" {self.schedule.upper()}"
            return f"goose local_pipeline x{self.partitions}{order}, checkpoint {self.checkpoint}"
        if self.runner == "hf-batch":
            return "🤗 one batch"
        return "🤗 accumulation" + (", gradient checkpointing" if self.checkpoint == "always" else "")


#: 1F1B (issue 10, item 4) keeps at most p micro-batches' activations where GPipe keeps M: at
#: p=1 it should hold what 🤗 accumulation holds. Its cases run once local_pipeline takes it.
SCHEDULES = ("gpipe", "1f1b") if "schedule" in inspect.signature(local_pipeline).parameters else ("gpipe",)

CASES = (Case("hf-batch"), Case("hf-accumulate", "never"), Case("hf-accumulate", "always"),
         *(Case("goose", mode, p, schedule) for schedule in SCHEDULES for p in (1, 2) for mode in CHECKPOINT_MODES),
         # recompute inside the blocks only, beside 🤗's checkpointing of every layer
         *(Case("goose", mode) for mode in BLOCK_MODES))


def build_model(shape: Shape, device: torch.device, seed: int = 0) -> nn.Module:
    """A freshly initialised fp32 model on ``device`` (the same weights in every case)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config())
    return model.train()


def _prepare(case: Case, model: nn.Module, shape: Shape, device: torch.device) -> nn.Module:
    if case.runner == "goose":
        order = {} if case.schedule == "gpipe" else {"schedule": case.schedule}  # GPipe: the default
        return local_pipeline(model, case.partitions, shape.microbatches, recompute=case.checkpoint,
                              devices=[device] * case.partitions, **order)
    if case.checkpoint == "always":
        # Every layer, non-reentrant: it keeps the autocast and RNG state for the recompute, as
        # torch recommends. (transformers 5 renamed gradient_checkpointing_enable.)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _step(case: Case, model: nn.Module, optimizer: torch.optim.Optimizer, tokens: Tensor, shape: Shape,
          precision: str, device: torch.device) -> Callable[[], None]:
    """One training step; forwards under the precision's autocast, backwards outside it."""
    # 🤗's accumulation: each micro-batch's loss is its token-loss sum over the whole batch's
    # targets (labels = inputs; the model shifts them), so the gradients add up to the batch mean.
    pieces = tokens.chunk(shape.microbatches) if case.runner == "hf-accumulate" else (tokens,)
    extra = {"num_items_in_batch": tokens.shape[0] * (tokens.shape[1] - 1)} if len(pieces) > 1 else {}

    def step() -> None:
        for x in pieces:
            with autocast(precision, device):
                loss = model(input_ids=x, labels=x, **extra).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run_case(case: Case, shape: Shape, precision: str, device: torch.device, warmup: int, steps: int,
             peak_flops: float) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of ``case`` on a fresh model and measure them; running out
    of memory, or failing, is a result (a row with that status and no timings), not a crash."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row: dict[str, Any] = {"case": case.name, "runner": case.runner, "checkpoint": case.checkpoint,
                           "partitions": case.partitions, "schedule": case.schedule, "precision": precision,
                           "tokens_per_step": shape.batch_size * shape.seq_len, "micro_batch": shape.micro_batch,
                           "microbatches": shape.microbatches, "seq_len": shape.seq_len, "peak_flops": peak_flops}
    reset_peak_memory(device)
    try:
        times = _train(case, shape, precision, device, warmup, steps, row)
    except torch.OutOfMemoryError as err:
        return {**row, "status": f"out of memory: {str(err).splitlines()[0][:120]}"}
    except Exception as err:  # noqa: BLE001 (on a GPU lent for minutes, one failing case must not lose the rest)
        traceback.print_exc()
        return {**row, "status": f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {**row, "status": "ok", "step_s": median, "step_q1_s": q1, "step_q3_s": q3,
            "tokens_per_s": row["tokens_per_step"] / median, "peak_memory_bytes": peak_memory(device),
            "mfu": mfu(row["flops_per_step"], median, peak_flops)}


def _train(case: Case, shape: Shape, precision: str, device: torch.device, warmup: int, steps: int,
           row: dict[str, Any]) -> list[float]:
    """Build, warm up, and time ``steps`` steps; fills the row's model facts; returns step seconds."""
    model = _prepare(case, build_model(shape, device), shape, device)
    row.update(matmul_params=matmul_parameters(model), flops_per_step=training_flops(model, shape.batch_size,
                                                                                     shape.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device).manual_seed(0)
    tokens = torch.randint(model.config.vocab_size, (shape.batch_size, shape.seq_len), device=device, generator=gen)
    step = _step(case, model, optimizer, tokens, shape, precision, device)
    with tf32(device):
        for _ in range(warmup):
            step()
        synchronize(device)
        timer = StepTimer(device)
        timer.mark()
        for _ in range(steps):
            step()
            timer.mark()
        return timer.seconds()


def plan(shape: Shape, precision: str) -> dict[str, Any]:
    """``goose plan``'s one-device prediction for ``shape`` (the module docstring), or nothing
    under autocast."""
    if precision != "tf32":
        return {}
    config = shape.config()
    layout = Layout(batch_size=shape.batch_size, microbatches=shape.microbatches, seq_len=shape.seq_len)
    rank = predict(config, layout, attention=config._attn_implementation)[0]
    held = rank.params_bytes + rank.grads_bytes + rank.masters_bytes + rank.optimizer_bytes
    return {"plan_peak_bytes": held + rank.activations_peak_bytes, "plan_flops": rank.flops_per_step}


def _planned(case: Case) -> bool:
    """The cases whose activations are one micro-batch's, nothing recomputed: what the plan is of."""
    return case.checkpoint == "never" and (case.runner == "hf-accumulate" or
                                           (case.runner == "goose" and case.partitions == 1))


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build. Install a CUDA build into the "
                f"environment (e.g. `.venv/bin/pip install torch --index-url "
                f"https://download.pytorch.org/whl/cu128`) on a machine with an NVIDIA GPU")
    return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU"


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: a smoke test; writes no results")
    parser.add_argument("--model", action="append", choices=sorted(FULL), help="repeatable; default: all")
    parser.add_argument("--precision", action="append", choices=PRECISIONS, help="repeatable; default: all")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be >= 1, got {args.warmup} and {args.steps}")
    if torch.device(args.device).type == "cpu" and not args.tiny:
        parser.error("--device cpu needs --tiny: the 124M and 1B configs would take hours a step on a CPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench-gpu: skipped, no CUDA device: {_why_no_cuda()}. "
              f"(`python -m benchmarks.gpu --device cpu --tiny` runs every case on tiny configs.)")
        return 0
    measure_all(device, args.tiny, args.model or sorted(FULL), args.precision or list(PRECISIONS),
                args.warmup, args.steps)
    return 0


def measure_all(device: torch.device, tiny: bool, models: list[str], precisions: list[str], warmup: int,
                steps: int) -> list[dict[str, Any]]:
    """Every case of ``models`` x ``precisions``, printed as it finishes; a full-size run also
    appends each to gpu_results.json and rewrites gpu.md (a run cut short keeps its cases)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shapes = TINY if tiny else FULL
    run = time.strftime("%Y-%m-%d %H:%M:%S")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        peak = measure_peak_flops(device, precision, TINY_PEAK_MATMUL if tiny else PEAK_MATMUL)
        print(f"== {precision}: peak {peak / 1e12:.1f} TFLOP/s ({'bf16' if precision == 'bf16' else 'TF32'} "
              f"matmul on {gpu or device})", flush=True)
        for name in models:
            before = load_average()
            predicted = plan(shapes[name], precision)
            for case in CASES:
                row = run_case(case, shapes[name], precision, device, warmup, steps, peak)
                if predicted and _planned(case):
                    row.update(predicted, plan_step_s=predicted["plan_flops"] / peak)
                row.update(model=name, run=run, tiny=tiny,
                           environment={**environment(before, gpu), "cuda": torch.version.cuda})
                print(_line(row), flush=True)
                rows.append(row)
                if not tiny:
                    append_and_publish([row])
    return rows


def _line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['model']:10} {row['precision']:5} {row['case']:50} {row['status']}"
    memory = row["peak_memory_bytes"]
    planned = (f"  plan {row['plan_peak_bytes'] / 2**30:.2f} GiB, >= {row['plan_step_s'] * 1e3:.2f} ms"
               if "plan_peak_bytes" in row else "")
    return (f"{row['model']:10} {row['precision']:5} {row['case']:50} {row['tokens_per_s']:12.0f} tok/s "
            f"{row['step_s'] * 1e3:9.2f} ms  MFU {row['mfu']:6.1%}  "
            f"peak {'-' if memory is None else f'{memory / 2**30:.2f} GiB'}{planned}")


if __name__ == "__main__":
    sys.exit(main())
