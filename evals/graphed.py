"""Transformer calls replayed from CUDA graphs in suite generation, as `evals bench --cuda-graph` times
them: an SD3.5 step launches about a thousand kernels, and a replay launches them at once.

`graph_transformer(transformer)` wraps the module's forward. Each distinct call (the shapes and dtypes
of its tensors; anything but the keyword arguments the SD3 pipeline passes runs as before) is warmed
on a side stream, captured once, and replayed with its inputs copied into the graph's own buffers.
The replay runs the very kernels the launched call runs, so images do not change (checked on a GPU
by tests/test_graphed.py). A call that cannot be captured runs launched from then on, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

CALL_KEYWORDS = {"hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"}
"""The tensors the SD3 pipeline (and the step-error scoring) pass; a call with others runs launched."""
MAX_GRAPHS = 6
"""Distinct call shapes captured per transformer (the suite's batch, a last shorter batch, the
guard's single images...); each holds its own activations' memory, so further shapes run launched."""
WARMUP_CALLS = 2  # the first call may compile (inductor) or pick kernels; the capture must see neither


class GraphedForward:
    """A transformer's forward with CUDA-graph replay per call shape (see the module's docstring)."""

    def __init__(self, module: Any, name: str):
        self.module, self.name = module, name
        self.launched = module.forward  # the bound forward it replaces
        self.graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], Any]] = {}
        self.broken: str | None = None  # why capture failed: every call is launched from then on

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in kwargs.items() if k not in tensors}
        plain = set(tensors) == CALL_KEYWORDS and rest.get("joint_attention_kwargs") is None
        plain = plain and set(rest) <= {"joint_attention_kwargs", "return_dict"} and not args
        if not plain or self.broken or (not torch.is_inference_mode_enabled() and torch.is_grad_enabled()):
            return self.launched(*args, **kwargs)
        key = (rest.get("return_dict", True), *((k, v.shape, v.dtype, v.device) for k, v in sorted(tensors.items())))
        found = self.graphs.get(key)
        if found is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return self.launched(*args, **kwargs)
            found = self._capture(key, tensors, rest)
            if found is None:
                return self.launched(*args, **kwargs)
        graph, static, output = found
        for k, v in tensors.items():
            static[k].copy_(v)
        graph.replay()
        return _cloned(output)

    def _capture(
        self, key: tuple[Any, ...], tensors: dict[str, torch.Tensor], rest: dict[str, Any]
    ) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], Any] | None:
        static = {k: v.clone() for k, v in tensors.items()}
        try:
            side = torch.cuda.Stream(static["hidden_states"].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self.launched(**static, **rest)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.launched(**static, **rest)
        except Exception as exc:  # noqa: BLE001 - any failure to capture leaves the launched path
            self.broken = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning(
                f"{self.name}: its transformer steps cannot be replayed from a CUDA graph ({self.broken}); launched"
            )
            torch.cuda.synchronize()
            return None
        self.graphs[key] = (graph, static, output)
        return self.graphs[key]


def _cloned(output: Any) -> Any:
    """The graph's output copied out of its buffers (the next replay overwrites them)."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_cloned(o) for o in output)
    if hasattr(output, "sample"):  # a diffusers Transformer2DModelOutput (return_dict=True)
        return type(output)(sample=output.sample.clone())
    return output


def graph_transformer(transformer: Any, name: str) -> GraphedForward | None:
    """Replay `transformer`'s calls from CUDA graphs from now on (its forward is replaced on the
    instance; `ungraph` restores it); None off CUDA, where there is nothing to replay."""
    device = next(transformer.parameters()).device
    if device.type != "cuda":
        return None
    if isinstance(transformer.forward, GraphedForward):
        return transformer.forward
    graphed = GraphedForward(transformer, name)
    transformer.forward = graphed
    return graphed


def ungraph(transformer: Any) -> None:
    """Launch `transformer`'s calls again (its graphs and their memory are released)."""
    if isinstance(transformer.forward, GraphedForward):
        del transformer.forward  # the class's forward shows through again
