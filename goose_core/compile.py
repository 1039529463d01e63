"""``torch.compile`` per transformer block: the way to compile a model under any goose layout.

A pipelined model's forward is the pipeline's executor: autograd functions that join cells
through phonies, point-to-point sends, a loss built from several micro-batches. Dynamo cannot
trace that as one graph (the phonies alias across its higher-order ops), and a graph of it
would freeze one schedule's order anyway. What is worth compiling is inside the blocks, so
goose compiles each block on its own, as torchtitan does, and leaves everything around them
eager::

    embed ─► [block 0]* ─► [block 1]* ─► ... ─► head ─► loss     * compiled, one graph per block
      ▲ eager: the stage's cells, joins, sends, recompute, the head, the loss

    model = PipelineParallel(model, ctx, ...).parallelize()     # or TensorParallel, DataParallel,
    compile_blocks(model, backend="inductor")                    #   local_pipeline, one device

``compile_blocks`` works on every wrapper's result (each returns the model itself) and on a
single-device model, so the compiled reference and the compiled layout run the same graphs.
One limit, torch's: a block recompute mode becomes a checkpoint region inside the compiled
graph, and dynamo traces that region without the caller's torch function modes. The float64
harness's widening (:mod:`goose_core.testing.widen`) is one, so a compiled Llama under
``"blocks"`` or ``"selective"`` rounds its norms in float32 there (1.4e-11 from the compiled
``never`` run after 2 steps); without the mode the two are bit-identical.

``torch.compile(model)`` or ``model.compile()`` of a pipelined model is refused on its first
forward, on every rank alike, before the pipeline's first message (:func:`refuse_whole_model_compile`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["compile_blocks", "refuse_whole_model_compile"]


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile the forward of each transformer block ``model`` holds, in place (blocks held by
    other pipeline stages are skipped); ``compile_kwargs`` go to :func:`torch.compile`. Returns
    ``model``.

    The block's ``forward`` is compiled, not its ``__call__`` (``block.compile()``): the stage
    hooks the first and the last block it holds for one cell at a time (feed the received
    activation in, stop at the last block), and hooks inside a compiled call would be part of
    its guards, recompiling every cell. Parameter names do not change. Apply it after the
    layout's wrappers and after a block recompute mode (the compiled forward then contains the
    checkpoint, as torchtitan compiles its checkpointed blocks).

    Raises:
        ValueError: ``model`` has no known pipeline parts (its blocks cannot be found).
    """
    from goose_core.pipeline.split import Placeholder, pipeline_parts_of  # the pipeline imports this module

    blocks = model.get_submodule(pipeline_parts_of(model).blocks)
    for block in blocks:
        if not isinstance(block, Placeholder):
            block.forward = torch.compile(block.forward, **compile_kwargs)  # type: ignore[method-assign]
    return model


def _dynamo_running() -> bool:
    """True in a frame dynamo traces, or runs after giving up tracing it (its frame callback is
    still set); False in eager code, also between two compiled blocks."""
    if torch.compiler.is_compiling():
        return True
    from torch._C._dynamo.eval_frame import get_eval_frame_callback  # no public equivalent
    return get_eval_frame_callback() is not None


def refuse_whole_model_compile(what: str) -> None:
    """Raise when ``what``'s forward runs under ``torch.compile`` of the whole model.

    Raises:
        TypeError: naming the per-block way.
    """
    if _dynamo_running():
        raise TypeError(
            f"torch.compile of a whole {what} is not supported: its forward is the pipeline's "
            f"executor (phonies, sends, recompute), which dynamo cannot trace. Compile its blocks "
            f"instead: goose_core.compile_blocks(model, **compile_kwargs) on the uncompiled model")
