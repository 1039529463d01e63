"""NOTES.md's error table: how far micro-batching moves the weights under AdamW and under SGD.

    python stages/12_partitioning/measure.py

float64, two steps of train.py's uneven Llama: the whole batch on one device, against the same
batches cut into 4 micro-batches on one stage (gradient accumulation, no pipeline) and on two
stages split ``[7, 1]`` (the memory split), both in this process (``local_pipeline``). Prints the
largest parameter difference of each as a Markdown table.
"""

from __future__ import annotations

import torch
from torch import nn

from goose_core.pipeline import local_pipeline
from goose_core.testing import TrainSpec, snapshot
from train import SPEC, single_device_run, train_step, uneven_model

#: (row label, stages, split) of each micro-batched run.
RUNS = (("one device, gradients accumulated over 4 micro-batches", 1, [8]),
        ("2 stages, memory split `[7, 1]`, 4 micro-batches", 2, [7, 1]))


def trained(model: nn.Module, spec: TrainSpec) -> dict[str, torch.Tensor]:
    optimizer = spec.build_optimizer(model.parameters())
    for batch in spec.batches():
        train_step(model, optimizer, batch)
    return snapshot(model)


def max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def main() -> None:
    errors: dict[str, list[float]] = {label: [] for label, _, _ in RUNS}
    for optimizer in ("adamw", "sgd"):
        spec = TrainSpec(family=SPEC.family, steps=2, optimizer=optimizer, overrides=SPEC.overrides)
        whole = single_device_run(spec, uneven_model(spec)).params
        for label, stages, split in RUNS:
            model = local_pipeline(uneven_model(spec), stages, 4, recompute="never", partitioner=split)
            errors[label].append(max_error(trained(model, spec), whole))
    print("| run against the whole batch on one device | AdamW | SGD |\n|---|---|---|")
    for label, (adamw, sgd) in errors.items():
        print(f"| {label} | {adamw:.1e} | {sgd:.1e} |")


if __name__ == "__main__":
    main()
