"""A pipeline rank's share of the plan: the parts each chunk it holds runs, its activation peak
walked along its program of the schedule, and the bytes it sends over the pp group.

The schedules are engine/schedule.py's own: a rank's program (``rank_actions``) lists its F, B
and W of every chunk it holds, in order, so interleaved 1F1B's and ZBV's two chunks per rank and
ZB's deferred W need nothing of their own here; pipeline/parallel.py's ``counts`` say which
blocks each chunk holds.
"""

from __future__ import annotations

from fractions import Fraction
import torch
from transformers import PretrainedConfig

from goose_core.data_parallel.bucket import main_dtype
from goose_core.engine.schedule import Schedule
from goose_core.loss import loss_dtype
from goose_core.pipeline import PipelineParallel
from goose_core.plan.layout import Layout
from goose_core.plan.trace import POST, PRE

__all__ = ["chunk_parts", "rank_peak", "pp_sent", "hidden", "width", "ring2"]


def _stage_parts(parts: list[str], owned: set[str], first: bool, last: bool) -> set[str]:
    """The parts a stage runs: its blocks; before the first block, the first stage's; after the
    last, the last stage's (pipeline/split.py); the parent code before the blocks on every stage."""
    blocks = [i for i, name in enumerate(parts) if name.rsplit(".", 1)[-1].isdigit()]
    mine = {PRE} | {parts[i] for i in blocks if parts[i] in owned}
    if first:
        mine |= set(parts[: blocks[0]])
    if last:
        mine |= set(parts[blocks[-1] + 1:]) | {POST}
    return mine


def chunk_parts(names: list[str], wrapper: PipelineParallel | None, layout: Layout, rank: int) -> dict[int, set[str]]:
    """{chunk: the parts its cell runs} for every chunk (partition) ``rank`` holds; one chunk
    of every part at pp = 1."""
    blocks = [n for n in names if n.rsplit(".", 1)[-1].isdigit()]
    if wrapper is None:
        return {0: _stage_parts(names, set(blocks), True, True)}
    n = wrapper.num_chunks
    starts = [sum(wrapper.counts[:c]) for c in range(n)]
    return {c: _stage_parts(names, set(blocks[starts[c]: starts[c] + wrapper.counts[c]]), c == 0, c == n - 1)
            for c in layout.pipeline_schedule().partitions_of(rank)}


def rank_peak(layout: Layout, schedule: Schedule, rank: int, full: dict[int, int], early: dict[int, int],
               lookups: int, cell_input: int) -> int:
    """A pipeline rank's saved bytes at their peak, its program (engine/schedule.py) walked in
    order, from one micro-batch's ``full`` bytes per chunk it holds, ``lookups`` (the first
    chunk's token lookups, made for every micro-batch before the schedule runs and kept to the
    end) and ``cell_input`` (what a recomputed cell keeps)::

        F  kept cell:        + full          recomputed cell (always; except_last: all but the
                                             last micro-batch):  + cell_input
        B  recomputed cell:  the cell rebuilt beside what is alive (its input becomes full: the
                             peak), then - cell_input; under a split backward its input becomes
                             the rebuilt graph, held to W like a kept cell's
           kept cell:        - full          (split backward: - early, the saves of the loss, which
                                             no W reaches; the rest is kept for W)
        W  (split backward)  - (full - early)

    A block mode's cell is a kept cell whose ``full`` is what the checkpoints keep (the trace
    ran them); the replay's own saves, one block at a time, are not saved-tensor hooks' to see.
    """
    m, split = layout.microbatches, schedule.split_backward
    alive = m * lookups if 0 in full else 0
    peak = alive
    rebuilt: set[tuple[int, int]] = set()
    for action in schedule.rank_actions(rank):
        bytes_, i = full[action.partition], action.microbatch
        redo = layout.recompute == "always" or (layout.recompute == "except_last" and i < m - 1)
        if action.kind == "F":
            alive += cell_input if redo else bytes_
        elif action.kind == "B":
            if redo and (i, action.partition) not in rebuilt:
                # the cell rebuilt from its input, with the chunks before it on this rank that
                # feed it in memory (ZBV's turn: one connected run, rebuilt at its first B)
                run = [action.partition]
                while run[-1] - 1 in full:
                    run.append(run[-1] - 1)
                rebuilt.update((i, c) for c in run)
                alive += sum(full[c] - cell_input for c in run)
                peak = max(peak, alive)
            alive -= early[action.partition] if split else bytes_
        else:  # W
            alive -= bytes_ - early[action.partition]
        peak = max(peak, alive)
    return peak


def pp_sent(config: PretrainedConfig, layout: Layout, rank: int, dtype: torch.dtype) -> Fraction:
    """Each micro-batch's hidden state from each chunk of the rank to the next chunk and its
    gradient to the previous one, where that chunk is on another rank (ZBV's turn at rank p - 1
    is handed over in memory); once a step, the activation's header (engine.p2p: 10 int64)
    forward on each boundary the rank sends over, and the loss's broadcast from the last chunk's rank (pipeline.stage, in loss_dtype);
    the tied embedding's gradient summed over the two ranks that hold the ends."""
    schedule = layout.pipeline_schedule()
    n, on = schedule.num_partitions, schedule.rank_of
    one = layout.batch_size // layout.dp * layout.seq_len * hidden(config) * width(dtype)  # all micro-batches
    crossings = sum((c < n - 1 and on(c + 1) != rank) + (c > 0 and on(c - 1) != rank)
                    for c in schedule.partitions_of(rank))
    header = 10 * 8 * sum(c < n - 1 and on(c + 1) != rank for c in schedule.partitions_of(rank))
    loss = Fraction((layout.pp - 1) * width(loss_dtype(dtype)), layout.pp)
    tied = 0
    ends = {on(0), on(n - 1)}
    if getattr(config, "tie_word_embeddings", False) and layout.pp == 2 and len(ends) == 2:  # pp > 2: their own group
        rows = config.vocab_size // layout.tp  # the embedding's gradient summed over the two stages
        tied = ring2(2, rows * hidden(config) * width(main_dtype(dtype)))  # summed in the grads' dtype
    return one * crossings + header + loss + tied


def hidden(config: PretrainedConfig) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def width(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def ring2(n: int, size: int) -> Fraction:
    """An all-reduce of ``size`` bytes, as count_traffic counts it."""
    return Fraction(2 * (n - 1) * size, n)
