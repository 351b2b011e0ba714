"""`evals bench`: transformer step latency, pipeline time, memory and compile time of the reference
and each FP8 candidate, measured in one process so that their ratios compare like with like.

A step is one transformer forward at the given resolution and batch (the batch the transformer sees:
with classifier-free guidance one image is a batch of 2). Latency: warm-up, then CUDA events (wall
clock on the CPU), median. Compile time: the first call's time less a warm step's. An architecture
folder (`models/configs/sd35-large`: a transformer config and nothing else) gets random weights,
which time the same as real ones. A full pipeline source is also timed end to end (seconds per image)
and weighed whole (every component's weights, and the peak GPU memory of an image), each candidate
built as `evals run` builds it (every component its policy names, or its factory's build).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evals.compiling import CompileReport, compile_blocks, explain_failure
from evals.models.precision import tensor_bytes
from evals.models.yamlspec import InputError

log = logging.getLogger(__name__)

CLIP_TOKENS = 77  # text tokens of the CLIP encoders; T5's follow, max_sequence_length of them
GIB = 1024**3


@dataclass
class BenchResult:
    name: str
    """`reference` or the policy name."""
    dtype: str
    """Reference dtype / the candidate's compute dtype."""
    compiled: str
    """What was compiled: `blocks`, or `none` (eager)."""
    step_ms: float
    """Median transformer step, milliseconds."""
    step_ms_all: list[float]
    """Every timed step."""
    compile_s: float
    """First call less a warm step: compilation (and autotuning) time."""
    weights_gib: float
    """Transformer parameters and buffers (FP8 weights plus their scales for a candidate)."""
    peak_gib: float | None
    """Peak GPU memory of a step with this transformer as if alone: its weights plus the step's peak."""
    pipeline_s_per_image: float | None
    """Whole pipeline (text encoders, all steps, VAE), seconds per image; None for an architecture-only source."""
    compile_report: dict[str, Any] = field(default_factory=dict)
    """Graphs, graph breaks and recompiles dynamo reported; `fell_back` when blocks ran eager."""
    cuda_graph: bool = False
    """step_ms is the replay of a CUDA graph of the step."""
    step_ms_launched: float | None = None
    """With cuda_graph: the median step with its kernels launched one by one, as without."""
    pipeline_weights_gib: float | None = None
    """Every component's parameters and buffers (text encoders, transformer, VAE), as this variant
    runs them; None for an architecture-only source."""
    pipeline_peak_gib: float | None = None
    """Peak GPU memory of a whole image with this variant alone on the GPU: pipeline_weights_gib plus
    the call's peak above them; None off a GPU or without a pipeline."""


@dataclass
class BenchSetup:
    resolution: int = 1024
    batch: int = 2
    warmup: int = 3
    iters: int = 10
    steps: int = 28
    """Steps of the whole-pipeline timing."""
    compile: str = "blocks"
    cuda_graph: bool = False
    """Time the step as the replay of a CUDA graph (GPU only): the ~1000 kernels of an SD3.5 step
    then run without a launch each, as a serving stack that captures graphs runs them."""
    max_sequence_length: int = 256
    """T5 tokens of the prompt: the transformer sees 77 more (CLIP's), in the step and the pipeline."""


def architecture_only(source: str) -> bool:
    from evals.models.sources import shipped_config

    folder = shipped_config(source) or Path(source)
    return (
        folder.is_dir()
        and (folder / "transformer" / "config.json").is_file()
        and not (folder / "model_index.json").is_file()
    )


def random_transformer(
    folder: Path, dtype: torch.dtype, device: str, seed: int = 0, num_layers: int | None = None
) -> Any:
    """The architecture of `folder/transformer/config.json` with random weights, built on the device
    in its dtype (SD3.5-Large in float32 on the CPU would take minutes and 32 GB); `num_layers`
    keeps only that many blocks (profiling)."""
    from diffusers import SD3Transformer2DModel

    from evals.models.random_sd35 import built_on

    config = SD3Transformer2DModel.load_config(str(folder / "transformer"))
    if num_layers is not None:
        config = {**config, "num_layers": num_layers}
    torch.manual_seed(seed)
    with built_on(dtype, device):
        model = SD3Transformer2DModel.from_config(config)
    return model.eval().requires_grad_(False)


def step_inputs(transformer: Any, setup: BenchSetup, device: str) -> dict[str, torch.Tensor]:
    cfg, dtype = transformer.config, next(transformer.parameters()).dtype
    latent = setup.resolution // 8
    g = torch.Generator(device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    return {
        "hidden_states": rand(setup.batch, cfg.in_channels, latent, latent),
        "encoder_hidden_states": rand(setup.batch, CLIP_TOKENS + setup.max_sequence_length, cfg.joint_attention_dim),
        "pooled_projections": rand(setup.batch, cfg.pooled_projection_dim),
        "timestep": torch.full((setup.batch,), 500.0, device=device, dtype=dtype),
    }


def module_gib(module: Any) -> float:
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()]) / GIB


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], setup: BenchSetup, device: str) -> tuple[float, list[float]]:
    """(seconds of the first call, milliseconds of each timed call after the warm-up)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(setup.warmup):
        fn()
    times = []
    for _ in range(setup.iters):
        if device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return first, times


@torch.inference_mode()
def bench_transformer(name: str, transformer: Any, setup: BenchSetup, device: str, pipeline: Any = None) -> BenchResult:
    report = CompileReport()
    if setup.compile == "blocks":
        report = compile_blocks(transformer)
    inputs = step_inputs(transformer, setup, device)
    weights = module_gib(transformer)
    before = 0
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    step = lambda: transformer(**inputs, return_dict=False)  # noqa: E731
    try:
        first_s, times = time_calls(step, setup, device)
    except Exception as exc:
        raise explain_failure(exc) from exc
    peak = None
    if device.startswith("cuda"):
        peak = weights + (torch.cuda.max_memory_allocated(device) - before) / GIB
    report.finish()
    median = launched = statistics.median(times)
    graphed = setup.cuda_graph and device.startswith("cuda")
    if graphed:
        _, times = time_calls(capture_step(step), setup, device)
        median = statistics.median(times)
    elif setup.cuda_graph:
        log.warning(f"{name}: cuda_graph needs a CUDA device; steps timed as launched on {device}")
    per_image = pipeline_weights = pipeline_peak = None
    if pipeline is not None:
        per_image, pipeline_weights, pipeline_peak = time_pipeline(pipeline, transformer, setup, device)
    return BenchResult(
        name=name,
        dtype=str(next(transformer.parameters()).dtype).removeprefix("torch."),
        compiled=setup.compile,
        step_ms=median,
        step_ms_all=times,
        compile_s=max(first_s - launched / 1000, 0.0),
        weights_gib=weights,
        peak_gib=peak,
        pipeline_s_per_image=per_image,
        compile_report=asdict(report),
        cuda_graph=graphed,
        step_ms_launched=launched if graphed else None,
        pipeline_weights_gib=pipeline_weights,
        pipeline_peak_gib=pipeline_peak,
    )


def capture_step(step: Callable[[], Any]) -> Callable[[], Any]:
    """A CUDA graph of one warm step (warm-up on a side stream, as capture requires): its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def pipeline_gib(pipeline: Any) -> float:
    """Parameters and buffers of every component that is a module (text encoders, transformer, VAE)."""
    return sum(module_gib(c) for c in pipeline.components.values() if isinstance(c, torch.nn.Module))


def time_pipeline(pipeline: Any, transformer: Any, setup: BenchSetup, device: str) -> tuple[float, float, float | None]:
    """(seconds per image, pipeline GiB, peak GiB of a whole image or None off a GPU) of `pipeline`'s
    components around `transformer`. A warm call with guidance 4.5: batch/2 images, so that with
    classifier-free guidance the transformer sees the benched batch (and no new shape to compile)."""
    from evals.generation import generate
    from evals.suite_types import Case, Generation, Sample

    pipe = type(pipeline)(**dict(pipeline.components, transformer=transformer))
    pipe.set_progress_bar_config(disable=True)
    images = max(setup.batch // 2, 1)
    gen = Generation(setup.resolution, setup.resolution, setup.steps, 4.5, images, setup.max_sequence_length)
    case = Case(id="bench", prompt="a photo of a cat on a windowsill", seeds=tuple(range(images)))
    batch = [Sample(case, seed) for seed in case.seeds]
    generate(pipe, batch, gen)  # warm: the text encoders and VAE run for the first time here
    weights = pipeline_gib(pipe)
    before = 0
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)  # every variant's weights on the GPU now
    _sync(device)
    start = time.perf_counter()
    generate(pipe, batch, gen)
    _sync(device)
    seconds = (time.perf_counter() - start) / images
    peak = None
    if device.startswith("cuda"):  # as if alone: its own weights plus what the call added above them
        peak = weights + (torch.cuda.max_memory_allocated(device) - before) / GIB
    return seconds, weights, peak


def load_bench_model(source: str, dtype_name: str, device: str) -> tuple[Any, Any]:
    """(reference transformer, the loaded model, or None for an architecture-only source)."""
    from evals.models.sources import load_source, resolve_dtype, shipped_config

    if architecture_only(source):
        log.info(f"{source}: architecture only, random weights (timing only)")
        folder = shipped_config(source) or Path(source)
        return random_transformer(folder, resolve_dtype(dtype_name, device), device), None
    model = load_source(source, dtype_name, device)
    return model.pipeline.transformer, model


def build_variant(policy: Any, transformer: Any, model: Any) -> tuple[Any, Any]:
    """(candidate transformer, its whole pipeline or None): with a pipeline, the candidate `evals run`
    builds (every component the policy names, a factory's build); else the transformer's rules alone."""
    from evals.models.precision import apply_policy

    if model is None:
        if policy.factory:
            raise InputError(f"{policy.path}: a factory builds from a whole pipeline, not an architecture folder")
        components, _ = apply_policy(policy, {"transformer": transformer})
        return components["transformer"], None
    from evals.candidates import build_candidate
    from evals.suite_types import Generation

    candidate = build_candidate(model, policy, Generation(64, 64, 1, 0.0, 1))  # generation: calibration only
    return candidate.pipeline.transformer, candidate.pipeline


def run_bench(source: str, policies: list[str], setup: BenchSetup, device: str, dtype_name: str) -> list[BenchResult]:
    from evals.models.precision import load_policy

    loaded = [load_policy(p) for p in policies]  # bad names fail before minutes of loading
    for policy in loaded:
        if policy.needs_calibration:
            raise InputError(f"policy {policy.name}: static activations need calibration; bench dynamic policies")
    log.info(f"bench: loading {source}...")
    transformer, model = load_bench_model(source, dtype_name, device)
    pipeline = None if model is None else model.pipeline
    _announce("reference", setup, pipeline)
    results = [bench_transformer("reference", transformer, setup, device, pipeline)]
    log.info(_line(results[-1]))
    for policy in loaded:
        candidate, candidate_pipeline = build_variant(policy, transformer, model)
        _announce(policy.name, setup, candidate_pipeline)
        results.append(bench_transformer(policy.name, candidate, setup, device, candidate_pipeline))
        log.info(_line(results[-1]))
        del candidate, candidate_pipeline
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def _announce(name: str, setup: BenchSetup, pipeline: Any) -> None:
    what = f"{setup.warmup} warm-up and {setup.iters} timed steps"
    if setup.compile == "blocks":
        what = "compiling its blocks, then " + what
    if pipeline is not None:
        what += f", then one {setup.steps}-step image"
    log.info(f"bench: {name}: {what}...")


def _line(r: BenchResult) -> str:
    return f"  {r.name}: {r.step_ms:.1f} ms/step, compile {r.compile_s:.1f} s, weights {r.weights_gib:.2f} GiB"


def ratios(results: list[BenchResult]) -> dict[str, dict[str, float]]:
    """latency_ratio and weights_ratio of each candidate against the reference (lower is better)."""
    ref = results[0]
    return {
        r.name: {"latency_ratio": r.step_ms / ref.step_ms, "weights_ratio": r.weights_gib / ref.weights_gib}
        for r in results[1:]
    }


PIPELINE_FIGURES = ("peak_gib", "pipeline_s_per_image", "pipeline_weights_gib", "pipeline_peak_gib")
"""Figures of a suite's bench that a device or source may not give (None): left out when absent."""


def bench_suite_candidates(
    reference: Any, candidates: dict[str, Any], settings: dict[str, Any], device: str
) -> tuple[dict[str, dict[str, float]], list[BenchResult]]:
    """A suite's `bench`: each candidate pipeline's transformer step, and a whole image, against the
    reference pipeline's, after the run. Returns (policy -> latency_ratio, weights_ratio, step_ms,
    weights_gib, compile_s and those of PIPELINE_FIGURES measured; every result, reference first)."""
    setup = BenchSetup(**{**{"resolution": 1024, "batch": 2, "compile": "blocks"}, **settings})
    results = [bench_transformer("reference", reference.transformer, setup, device, reference)]
    results += [bench_transformer(name, pipe.transformer, setup, device, pipe) for name, pipe in candidates.items()]
    figures = {}
    for result in results[1:]:
        measured = {key: getattr(result, key) for key in PIPELINE_FIGURES if getattr(result, key) is not None}
        figures[result.name] = {
            **ratios([results[0], result])[result.name],
            "step_ms": result.step_ms,
            "weights_gib": result.weights_gib,
            "compile_s": result.compile_s,
            **measured,
        }
    return figures, results
