"""Stage 00: train a tiny Hugging Face causal LM on one device, the run every later stage must equal.

``train`` writes out the loop every later stage writes again around its wrapped model: forward,
backward, (clip), step, zero_grad. It is ``reference_run``'s loop, bit for bit.

Run it:

    python stages/00_reference/train.py                      # Llama (GQA), 20 steps
    python stages/00_reference/train.py --family gpt2 --steps 50
"""

from __future__ import annotations

import argparse

import torch

from goose_core.testing import RunResult, TINY_MODELS, TrainSpec, snapshot


def train(spec: TrainSpec) -> RunResult:
    """Train ``spec``'s seeded model on the whole global batch of every step, on one device."""
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    losses = []
    for step in range(spec.steps):
        loss = model(**spec.batch(step)).loss  # 🤗 shifts the labels and averages over the targets
        loss.backward()
        if spec.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, snapshot(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = TrainSpec(family=args.family, steps=args.steps, seed=args.seed)
    result = train(spec)
    for step, loss in enumerate(result.losses):
        print(f"step {step:>3}  loss {loss:.6f}")
    n_params = sum(p.numel() for p in result.params.values())
    print(f"{args.family}: {n_params:,} parameters, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")


if __name__ == "__main__":
    main()
