"""CUDA-graph replay of transformer steps (evals.graphed): the replayed images and teacher-forced
outputs are the launched ones, bit for bit; off CUDA nothing is wrapped; odd calls run launched."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from evals.generation import generate
from evals.graphed import GraphedForward, graph_transformer, ungraph
from evals.step_error.trajectory import recording, step_inputs, teacher_forced
from evals.suite_types import Case, Generation, Sample

GEN = Generation(height=64, width=64, steps=4, guidance=4.5, batch_size=2, max_sequence_length=8)
BATCH = [Sample(Case("a", "a red circle on a white background", (0,)), 0), Sample(Case("b", "a calm lake", (1,)), 1)]


def test_nothing_is_graphed_off_cuda(tiny_model: Any) -> None:
    transformer = tiny_model.pipeline.transformer
    assert graph_transformer(transformer, "reference") is None
    assert not isinstance(transformer.forward, GraphedForward)


@pytest.mark.gpu
def test_replayed_steps_give_the_launched_images_and_step_errors() -> None:
    from evals.candidates import build_candidate
    from evals.models.precision import load_policy
    from evals.models.sources import load_source

    pipe = load_source("tiny", "float32", "cuda").pipeline
    cand = build_candidate(load_source("tiny", "float32", "cuda"), load_policy("fp8-e4m3-rowwise"), GEN).pipeline
    with recording(pipe.transformer, (0, 2), GEN.guidance, len(BATCH)) as recorded:
        launched = generate(pipe, BATCH, GEN)
    traj = recorded[0]
    errors = teacher_forced(cand.transformer, traj)
    ref_graph, cand_graph = graph_transformer(pipe.transformer, "reference"), graph_transformer(cand.transformer, "c")
    assert ref_graph is not None and cand_graph is not None
    try:
        for _ in range(2):  # the first call captures, the second replays
            with recording(pipe.transformer, (0, 2), GEN.guidance, len(BATCH)) as again:
                assert torch.equal(generate(pipe, BATCH, GEN), launched)
            assert torch.equal(again[0].guided, traj.guided)  # the recording hook still sees every call
            replayed = teacher_forced(cand.transformer, traj)
            assert torch.equal(replayed.relative, errors.relative)
        assert ref_graph.graphs and cand_graph.graphs and not ref_graph.broken
        captured = len(ref_graph.graphs)
        inputs = step_inputs(traj, 0, "cuda")
        odd = pipe.transformer(**inputs, return_dict=False, skip_layers=None)[0]  # not the pipeline's call
        assert torch.equal(odd, pipe.transformer(**inputs, return_dict=False)[0]) and len(ref_graph.graphs) == captured
    finally:
        ungraph(pipe.transformer)
        ungraph(cand.transformer)
    assert not isinstance(pipe.transformer.forward, GraphedForward)
