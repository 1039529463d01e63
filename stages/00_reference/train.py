"""Stage 00: train a tiny Hugging Face causal LM on one device, the run every later stage must equal.

Run it:

    python stages/00_reference/train.py                      # Llama (GQA), 20 steps
    python stages/00_reference/train.py --family gpt2 --steps 50
"""

from __future__ import annotations

import argparse

from goose_core.testing import FAMILIES, TrainSpec, reference_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = TrainSpec(family=args.family, steps=args.steps, seed=args.seed)
    result = reference_run(spec)
    for step, loss in enumerate(result.losses):
        print(f"step {step:>3}  loss {loss:.6f}")
    n_params = sum(p.numel() for p in result.params.values())
    print(f"{args.family}: {n_params:,} parameters, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")


if __name__ == "__main__":
    main()
