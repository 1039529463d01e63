"""Stage 02: fp16 weights, fp32 master weights and dynamic loss scaling on one device, beside the fp32 run.

fp16 keeps 3 more significant bits than bf16 but far less range: what falls below 6e-8 is 0.
The loop multiplies the loss by a power of two S before the backward, so every gradient is S
times larger (exactly) and stays out of the underflow zone; ``GradScaler.unscale_`` divides S out
(exactly again), clipping sees the true gradients, and a step whose gradients hold an inf or a
NaN is skipped while S halves; ``growth_interval`` clean steps in a row double it. The script
prints each step's loss and scale beside the fp32 run and a verdict: EQUAL when every loss is
within fp16 roundoff (2**-12 relative) of the fp32 run's, else NOT EQUAL and exit status 1.

Run it:

    python stages/02_loss_scaling/train.py
    python stages/02_loss_scaling/train.py --init-scale 16777216    # 2**24: overflows, skips: NOT EQUAL
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from goose_core import GradScaler
from goose_core.optim import MasterWeights
from goose_core.testing import RunResult, TrainSpec, format_beside_reference, reference_run, snapshot

#: The GQA Llama (2 layers), AdamW with clipping; an fp32 spec: this script casts the model itself.
SPEC = TrainSpec(family="llama", steps=24, batch_size=4, seq_len=16, max_grad_norm=1.0, lr=1e-3,
                 dtype=torch.float32, overrides={"num_hidden_layers": 2})
#: fp16 roundoff, relative: half of fp16's spacing 2**-11 at the bottom of a binade.
BOUND = 2.0**-12


def train(spec: TrainSpec, dtype: torch.dtype = torch.float16, scaling: bool = True,
          init_scale: float = 2.0**16, growth_interval: int = 2000) -> tuple[RunResult, list[float]]:
    """Train ``spec``'s model cast to ``dtype`` with fp32 masters and a ``GradScaler`` (a pass-through
    unless ``scaling``). Returns the run and the scale after every step."""
    model = spec.build_model().to(dtype)  # weights and activations in fp16
    optimizer = MasterWeights(spec.build_optimizer(model.parameters()))  # fp32 copies (wider dtypes: as is)
    scaler = GradScaler(init_scale=init_scale, growth_interval=growth_interval, enabled=scaling)
    losses, scales = [], []
    for step in range(spec.steps):
        loss = model(**spec.batch(step)).loss  # fp16 matmuls; the loss itself in fp32
        scaler.scale(loss).backward()  # every gradient x S, exactly: S is a power of two
        scaler.unscale_(optimizer)  # the masters' fp32 gradients / S; found_inf if any is inf or NaN
        torch.nn.utils.clip_grad_norm_(optimizer.master_params(), spec.max_grad_norm)  # the TRUE gradients
        scaler.step(optimizer)  # optimizer.step(), skipped when found_inf: no parameter, no moment changes
        scaler.update()  # S x 0.5 after a skip, x 2 after growth_interval clean steps in a row
        optimizer.zero_grad()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    return RunResult(losses, snapshot(model)), scales


def verdict(losses: list[float], reference: list[float], what: str) -> tuple[bool, str]:
    """Whether every loss is within :data:`BOUND` (relative) of the fp32 run's, and the line saying so."""
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    equal = gap <= BOUND
    word = "EQUAL (within fp16 roundoff)" if equal else "NOT EQUAL (beyond fp16 roundoff)"
    sign = "<=" if equal else ">"
    return equal, f"{what} beside the fp32 run: max relative loss gap {gap:.1e} {sign} 2**-12 = {BOUND:.1e}: {word}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-scale", type=float, default=2.0**16, help="the first S, a power of two")
    parser.add_argument("--steps", type=int, default=SPEC.steps)
    args = parser.parse_args(argv)

    spec = replace(SPEC, steps=args.steps)
    result, scales = train(spec, init_scale=args.init_scale)
    fp32 = reference_run(spec).losses  # the same loop, all in fp32, no scaling
    print("each step's loss: this run (goose) beside the fp32 run (reference)")
    print(format_beside_reference(result.losses, fp32))
    skipped = [step for step, (before, after) in enumerate(zip([args.init_scale, *scales], scales)) if after < before]
    # a skipped step is one after which S went down: found_inf was set, S halved
    print(f"scale after each step: {' '.join(f'2**{torch.tensor(s).log2().item():g}' for s in scales)}")
    print(f"skipped steps: {skipped or 'none'}")
    equal, line = verdict(result.losses, fp32, "fp16 + fp32 masters + loss scaling")
    print(line)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
