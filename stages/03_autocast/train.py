"""Stage 03: fp32 parameters, bf16 (or fp16) compute under autocast, on one device, beside the fp32 run.

The model stays fp32, so its parameters are their own master weights and every gradient lands
in fp32. Only the forward runs under ``torch.autocast``: each matmul casts its fp32 inputs to
bf16 and runs in bf16; norms, softmax and the loss stay fp32; the backward (called outside the
block) runs every op in the dtype its forward ran in. fp16 also needs loss scaling (stage 02):
the same ``GradScaler``, enabled only for fp16. The script prints the dtypes the run used and a
verdict: EQUAL when every loss is within the format's roundoff of the fp32 run's AND the matmuls
really ran in the 16-bit format, else exit status 1.

Run it:

    python stages/03_autocast/train.py                    # bf16 autocast
    python stages/03_autocast/train.py --dtype fp16       # fp16 autocast + GradScaler
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
from torch import nn

from goose_core import GradScaler
from goose_core.testing import RunResult, TrainSpec, format_beside_reference, reference_run, snapshot

#: The GQA Llama (2 layers), AdamW with clipping, fp32 parameters.
SPEC = TrainSpec(family="llama", steps=24, batch_size=4, seq_len=16, max_grad_norm=1.0, lr=1e-3,
                 dtype=torch.float32, overrides={"num_hidden_layers": 2})
#: Each format's roundoff, relative: half its spacing at the bottom of a binade.
BOUNDS = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}


def train(spec: TrainSpec, dtype: torch.dtype = torch.bfloat16,
          device_type: str | None = None) -> tuple[RunResult, dict[str, set[torch.dtype]]]:
    """Train ``spec``'s fp32 model with its forward under ``dtype`` autocast for ``device_type``
    (default: the model's own). Returns the run and the dtypes seen: the Linear layers' outputs,
    the losses, the parameters and their gradients."""
    model = spec.build_model()  # fp32 parameters: they are their own master weights
    optimizer = spec.build_optimizer(model.parameters())
    scaler = GradScaler(enabled=dtype == torch.float16)  # fp16 underflows without it; bf16 does not
    device_type = device_type or model.device.type  # autocast acts on this device's ops only
    seen = {"linear outputs": _linear_output_dtypes(model), "losses": set(), "grads": set()}
    losses = []
    for step in range(spec.steps):
        with torch.autocast(device_type, dtype=dtype):
            loss = model(**spec.batch(step)).loss  # matmuls in dtype; norms, softmax, the loss in fp32
        scaler.scale(loss).backward()  # outside the block: each op's backward in its forward's dtype
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)  # fp32 gradients
        seen["grads"] |= {p.grad.dtype for p in model.parameters()}
        scaler.step(optimizer)  # optimizer.step() (fp16: skipped when found_inf)
        scaler.update()
        optimizer.zero_grad()
        seen["losses"].add(loss.dtype)
        losses.append(loss.item())
    seen["params"] = {p.dtype for p in model.parameters()}
    return RunResult(losses, snapshot(model)), seen


def _linear_output_dtypes(model: nn.Module) -> set[torch.dtype]:
    """A set that collects the dtype of every ``nn.Linear`` output from now on (forward hooks)."""
    dtypes: set[torch.dtype] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda _module, _inputs, out: dtypes.add(out.dtype))
    return dtypes


def verdict(losses: list[float], reference: list[float], seen: dict[str, set[torch.dtype]],
            dtype: torch.dtype) -> tuple[bool, str]:
    """EQUAL when the matmuls ran in ``dtype`` and every loss is within its bound of the fp32 run's."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if seen["linear outputs"] != {dtype}:
        return False, (f"{name} autocast: NOT A {name} RUN: the matmuls ran in "
                       f"{sorted(str(d) for d in seen['linear outputs'])} (autocast for another device type?)")
    bound = BOUNDS[dtype]
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    equal = gap <= bound
    word = f"EQUAL (within {name} roundoff)" if equal else f"NOT EQUAL (beyond {name} roundoff)"
    return equal, (f"{name} autocast beside the fp32 run: max relative loss gap {gap:.1e} "
                   f"{'<=' if equal else '>'} 2**{int(torch.tensor(bound).log2())} = {bound:.1e}: {word}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--steps", type=int, default=SPEC.steps)
    args = parser.parse_args(argv)

    spec = replace(SPEC, steps=args.steps)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    result, seen = train(spec, dtype)
    fp32 = reference_run(spec).losses  # the same loop without autocast
    print("each step's loss: this run (goose) beside the fp32 run (reference)")
    print(format_beside_reference(result.losses, fp32))
    print("dtypes: " + "; ".join(f"{what} {sorted(str(d) for d in dtypes)}" for what, dtypes in seen.items()))
    equal, line = verdict(result.losses, fp32, seen, dtype)
    print(line)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
