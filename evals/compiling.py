"""Compiling the transformer block by block, and catching dynamo's silent fall-backs.

Compiling whole SD3.5 transformers misbehaves: SD3.5-Medium's first blocks (dual attention) differ
from the rest, and once dynamo's recompile limit is hit it runs the code eagerly *without an error*.
Per-block compilation keeps each graph small and lets identical blocks share one graph (parameters
are graph inputs), which also keeps compilation short; the activation quantization of FP8 layers is
fused with its neighbours inside each block. `fail_on_recompile_limit_hit` turns the silent
fall-back into an error, and the report counts graphs and graph breaks so a bench can show them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class CompileFellBack(RuntimeError):
    """Dynamo gave up compiling (recompile limit) and would have run blocks eagerly."""


def _counters() -> tuple[int, int, int]:
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"].get("unique_graphs", 0))
    breaks = int(sum(counters["graph_break"].values()))
    recompiles = int(counters["recompiles"].get("total", 0)) if "recompiles" in counters else 0
    return graphs, breaks, recompiles


@dataclass
class CompileReport:
    blocks: int = 0
    """Blocks compiled."""
    kinds: int = 0
    """Distinct kinds of block (the graphs to expect)."""
    graphs: int = 0
    """Distinct graphs dynamo compiled for them (1 per kind of block when all goes well)."""
    graph_breaks: int = 0
    """Graph breaks: each splits a block into pieces run eagerly in between."""
    mode: str = ""
    """torch.compile mode."""
    _start: tuple[int, int, int] = field(default=(0, 0, 0), repr=False)

    def finish(self) -> None:
        """Read dynamo's counters after the compiled blocks ran."""
        if not self.blocks:
            return
        now = _counters()
        self.graphs = now[0] - self._start[0]
        self.graph_breaks = now[1] - self._start[1]


def block_kind(block: Any) -> tuple[Any, ...]:
    """What makes dynamo compile a block separately: its submodules' types (dual attention, FP8 or
    plain linears) and the flags its code branches on (the last block is `context_pre_only`)."""
    modules = tuple((name, type(m).__name__) for name, m in block.named_modules())
    return modules, getattr(block, "context_pre_only", None)


def compile_blocks(transformer: Any, mode: str = "default", backend: str = "inductor") -> CompileReport:
    """Compile each `transformer_blocks[i]` in place (`nn.Module.compile`); raise CompileFellBack at
    run time rather than fall back to eager silently.

    Dynamo's recompile limit counts graphs per *code object*, which every block of every model in
    the process shares: the limit is raised by this transformer's number of block kinds, so a
    reference and several candidates compiled in one process each get room for their own graphs.
    """
    import torch._dynamo.config as dynamo_config

    blocks = list(transformer.transformer_blocks)
    kinds = len({block_kind(b) for b in blocks})
    dynamo_config.fail_on_recompile_limit_hit = True
    dynamo_config.recompile_limit += kinds
    for block in blocks:
        block.compile(dynamic=False, mode=None if mode == "default" else mode, backend=backend)
    return CompileReport(blocks=len(blocks), kinds=kinds, mode=mode, _start=_counters())


def explain_failure(exc: BaseException) -> BaseException:
    """A recompile-limit error says what it means for a bench; anything else is returned unchanged."""
    if "recompile" in str(exc).lower() and "limit" in str(exc).lower():
        return CompileFellBack(
            f"dynamo hit its recompile limit ({torch._dynamo.config.recompile_limit}): the blocks would run "
            f"eagerly and the figures would be wrong ({type(exc).__name__}: {str(exc)[:300]})"
        )
    return exc
