"""Stage 01: bf16 weights with fp32 master weights on one device, beside the fp32 run.

The model is cast to bf16: weights, activations and matmuls. ``MasterWeights`` keeps an fp32
copy of every weight, adds each bf16 gradient into the copy's fp32 ``.grad`` as autograd makes
it, steps the copies with the wrapped optimizer (its moments fp32 too), and rounds them back into
the bf16 weights once per step. The script trains it beside the same loop in fp32 and prints a
verdict: EQUAL when every step's loss is within bf16 roundoff (2**-9 relative) of the fp32 run's,
else NOT EQUAL and exit status 1. ``--plain`` drops the masters (plain bf16): it drifts off.

Run it:

    python stages/01_master_weights/train.py
    python stages/01_master_weights/train.py --plain        # bf16 without masters: NOT EQUAL
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
from torch import nn

from goose_core.optim import MasterWeights
from goose_core.testing import RunResult, TrainSpec, format_beside_reference, reference_run, snapshot

#: The GQA Llama (2 layers), AdamW with clipping; an fp32 spec: this script casts the model itself.
SPEC = TrainSpec(family="llama", steps=24, batch_size=4, seq_len=16, max_grad_norm=1.0, lr=1e-3,
                 dtype=torch.float32, overrides={"num_hidden_layers": 2})
#: bf16 roundoff, relative: half of bf16's spacing 2**-8 at the bottom of a binade.
BOUND = 2.0**-9


def train(spec: TrainSpec, masters: bool = True) -> tuple[RunResult, dict[str, float]]:
    """Train ``spec``'s model cast to bf16, with fp32 master weights unless ``masters`` is False.
    Returns the run and the bytes held per parameter in the middle of the first step."""
    model = spec.build_model().to(torch.bfloat16)  # weights and activations in bf16
    optimizer = spec.build_optimizer(model.parameters())
    if masters:
        optimizer = MasterWeights(optimizer)  # the wrapped optimizer now steps fp32 copies
    losses, held = [], {}
    for step in range(spec.steps):
        loss = model(**spec.batch(step)).loss  # bf16 matmuls; the loss itself in fp32
        loss.backward()  # each bf16 gradient is added into its master's fp32 .grad, then freed
        if spec.max_grad_norm is not None:
            params = optimizer.master_params() if masters else model.parameters()
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)  # the fp32 gradients' norm
        optimizer.step()  # an fp32 step, then one rounding of each master into its bf16 weight
        if step == 0:
            held = bytes_per_parameter(model, optimizer)  # gradients and Adam state both exist here
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, snapshot(model)), held


def bytes_per_parameter(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Bytes held per model parameter, by kind: weights, gradients (the model's or the masters'),
    fp32 masters and optimizer state. Each tensor counted once."""
    params = list(model.parameters())
    stepped = [p for group in optimizer.param_groups for p in group["params"]]  # masters, or params
    n = sum(p.numel() for p in params)

    def per_parameter(tensors: list[torch.Tensor]) -> float:
        unique = {id(t): t for t in tensors}.values()
        return sum(t.numel() * t.element_size() for t in unique) / n

    ours = {id(p) for p in params}
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"weights": per_parameter(params),
            "grads": per_parameter([p.grad for p in params + stepped if p.grad is not None]),
            "masters": per_parameter([m for m in stepped if id(m) not in ours]),
            "moments": per_parameter(state)}


def verdict(losses: list[float], reference: list[float], what: str) -> tuple[bool, str]:
    """Whether every loss is within :data:`BOUND` (relative) of the fp32 run's, and the line saying so."""
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    equal = gap <= BOUND
    word = "EQUAL (within bf16 roundoff)" if equal else "NOT EQUAL (beyond bf16 roundoff)"
    sign = "<=" if equal else ">"
    return equal, f"{what} beside the fp32 run: max relative loss gap {gap:.1e} {sign} 2**-9 = {BOUND:.1e}: {word}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="no master weights: bf16 grads, steps and moments")
    parser.add_argument("--steps", type=int, default=SPEC.steps)
    args = parser.parse_args(argv)

    spec = replace(SPEC, steps=args.steps)
    result, held = train(spec, masters=not args.plain)
    fp32 = reference_run(spec).losses  # the same loop, all in fp32
    print("each step's loss: this run (goose) beside the fp32 run (reference)")
    print(format_beside_reference(result.losses, fp32))
    parts = " + ".join(f"{kind} {held[kind]:g}" for kind in ("weights", "grads", "masters", "moments"))
    print(f"bytes per parameter: {parts} = {sum(held.values()):g} (all-fp32 AdamW: 4 + 4 + 0 + 8 = 16)")
    equal, line = verdict(result.losses, fp32, "plain bf16" if args.plain else "bf16 + fp32 masters")
    print(line)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
