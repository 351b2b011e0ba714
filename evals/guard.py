"""A guard in front of a diffusers SD3/SD3.5 pipeline: every image it makes is checked by failure
detectors (batched, on the pipeline's device, on the unclamped decode so NaN and Inf are still
visible), and a flagged image is made again by a retry policy, at most `max_tries` times:

    from evals.guard import Fallback, Reseed, guarded

    pipe = guarded(fp8_pipe, detectors=["nonfinite", "black_frame", "stripe_noise"],
                   on_failure=Fallback(bf16_pipe, max_tries=1))
    images = pipe(prompt=[...], generator=[torch.Generator().manual_seed(s) for s in seeds]).images

`Reseed(max_tries)` makes it again with the same pipeline and a new seed (derived from the image's
own, so a rerun repeats it); `Fallback(pipeline, max_tries)` with another pipeline (the reference),
first with the image's own seed. Every flag, repair and give-up is a `GuardEvent`: logged through
`logging`, handed to `on_event`, and counted in MLflow with `mlflow=True`. Images that pass cost only
the detectors (docs/production.md has the measured figure; `benchmarks/guard_overhead.py`).

The same core (`Guard.repair`) guards a suite's candidates (the `guard:` section of a suite).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from evals.detectors import DETECTORS, detect_batch
from evals.generation import decode_latents

log = logging.getLogger(__name__)

DEFAULT_DETECTORS = ("nonfinite", "black_frame", "saturation", "stripe_noise")
"""Failures a serving team retries: broken numerics, black or blown-out frames, stripe noise."""


@dataclass(frozen=True)
class Reseed:
    """Make a flagged image again with the same pipeline and a new seed, at most `max_tries` times."""

    max_tries: int = 2


@dataclass(frozen=True)
class Fallback:
    """Make a flagged image again with `pipeline` (e.g. the bf16 reference): first with the image's
    own seed, then with new seeds, at most `max_tries` times."""

    pipeline: Any
    max_tries: int = 1


RetryPolicy = Reseed | Fallback


@dataclass(frozen=True)
class GuardEvent:
    kind: str
    """`flagged` (an attempt was flagged), `repaired` (a retry passed) or `failed` (tries used up)."""
    index: int
    """The image's position in the call (or the suite's batch)."""
    prompt: str
    seed: int
    """The seed of the attempt the event is about."""
    attempt: int
    """0: the first image; 1..max_tries: the retries."""
    source: str
    """`pipeline` (the guarded one) or `fallback`."""
    flagged: dict[str, str] = field(default_factory=dict)
    """Detector -> reason, for a flagged attempt."""

    def describe(self) -> str:
        what = f"image {self.index} (seed {self.seed}, attempt {self.attempt}, {self.source})"
        if self.kind == "flagged":
            return f"guard: {what} flagged: " + "; ".join(f"{d}: {r}" for d, r in self.flagged.items())
        return f"guard: {what} " + ("repaired" if self.kind == "repaired" else "still flagged after every retry")


@dataclass(frozen=True)
class ImageOutcome:
    """What the guard did for one image; a suite's records carry it as `guard`."""

    tries: int
    """Retries made (0: the first image passed)."""
    outcome: str
    """`passed` (first time), `repaired` or `failed` (still flagged after every retry)."""
    seed: int
    """The seed of the image returned."""
    source: str
    """Which pipeline made the image returned: `pipeline` or `fallback`."""
    flagged: dict[str, str] = field(default_factory=dict)
    """Why the first image was flagged (detector -> reason); empty when it passed."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retry_seed(seed: int, attempt: int) -> int:
    """A new seed for a retry, derived from the image's own (a rerun retries with the same ones)."""
    digest = hashlib.sha256(f"evals-guard:{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


Regenerate = Callable[[str, list[int], list[int]], torch.Tensor]
"""(source, image indices, seeds) -> those images made again, float NCHW 0..1 unclamped."""


class Guard:
    """Detectors and a retry policy; `repair` applies them to a batch of decoded images."""

    def __init__(
        self,
        detectors: Sequence[str] = DEFAULT_DETECTORS,
        on_failure: RetryPolicy | None = None,
        thresholds: dict[str, dict[str, Any]] | None = None,
        on_event: Callable[[GuardEvent], None] | None = None,
        mlflow: bool = False,
    ):
        unknown = [d for d in detectors if d not in DETECTORS]
        if unknown or not detectors:
            raise ValueError(f"guard detectors {list(detectors)}: expected some of {sorted(DETECTORS)}")
        self.on_failure = on_failure if on_failure is not None else Reseed()
        if self.on_failure.max_tries < 1:
            raise ValueError(f"max_tries {self.on_failure.max_tries}: expected 1 or more")
        self.detectors, self.thresholds = tuple(detectors), thresholds or {}
        self.on_event, self.mlflow = on_event, mlflow
        self.counts = {"images": 0, "flagged": 0, "repaired": 0, "failed": 0}

    def flags(self, raw: torch.Tensor) -> list[dict[str, str]]:
        """Detector -> reason for each flagged detector of each image (NCHW, on its own device)."""
        found = detect_batch(raw.permute(0, 2, 3, 1), self.detectors, self.thresholds)
        return [{name: f.reason for name, f in item.items() if f.flagged} for item in found]

    def _emit(self, event: GuardEvent) -> None:
        level = {"flagged": logging.WARNING, "repaired": logging.INFO, "failed": logging.ERROR}[event.kind]
        log.log(level, event.describe())
        if self.on_event is not None:
            self.on_event(event)

    def repair(
        self, raw: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int], regenerate: Regenerate
    ) -> tuple[torch.Tensor, list[ImageOutcome]]:
        """Check `raw` (NCHW 0..1, unclamped); make every flagged image again until it passes or the
        tries run out. Returns the images (flagged ones replaced by their last attempt) and what was done."""
        flags = self.flags(raw)
        source = "fallback" if isinstance(self.on_failure, Fallback) else "pipeline"
        outcomes = [ImageOutcome(0, "passed", seed, "pipeline") for seed in seeds]
        pending = [i for i, f in enumerate(flags) if f]
        for i in pending:
            outcomes[i] = ImageOutcome(0, "failed", seeds[i], "pipeline", flags[i])
            self._emit(GuardEvent("flagged", i, prompts[i], seeds[i], 0, "pipeline", flags[i]))
        raw = raw.clone() if pending else raw
        for attempt in range(1, self.on_failure.max_tries + 1):
            if not pending:
                break
            # A fallback first tries the image's own seed: the reference's image of that request.
            keep_seed = source == "fallback" and attempt == 1
            tried = [seeds[i] if keep_seed else retry_seed(seeds[i], attempt) for i in pending]
            again = regenerate(source, pending, tried).to(raw.device)
            again_flags = self.flags(again)
            still = []
            for j, i in enumerate(pending):
                raw[i] = again[j]
                first = outcomes[i].flagged
                if again_flags[j]:
                    outcomes[i] = ImageOutcome(attempt, "failed", tried[j], source, first)
                    self._emit(GuardEvent("flagged", i, prompts[i], tried[j], attempt, source, again_flags[j]))
                    still.append(i)
                else:
                    outcomes[i] = ImageOutcome(attempt, "repaired", tried[j], source, first)
                    self._emit(GuardEvent("repaired", i, prompts[i], tried[j], attempt, source))
            pending = still
        for i in pending:
            o = outcomes[i]
            self._emit(GuardEvent("failed", i, prompts[i], o.seed, o.tries, o.source))
        self._count(outcomes)
        return raw, outcomes

    def _count(self, outcomes: list[ImageOutcome]) -> None:
        self.counts["images"] += len(outcomes)
        self.counts["flagged"] += sum(o.tries > 0 for o in outcomes)
        self.counts["repaired"] += sum(o.outcome == "repaired" for o in outcomes)
        self.counts["failed"] += sum(o.outcome == "failed" for o in outcomes)
        if self.mlflow:
            import mlflow

            # Cumulative counts into the active MLflow run (MLflow starts one when none is active).
            mlflow.log_metrics({f"guard_{k}": float(v) for k, v in self.counts.items()}, step=self.counts["images"])


def _per_image(value: Any, n: int, per_prompt: int, what: str) -> list[Any]:
    """A prompt-level argument (one value, or one per prompt) as one value per image."""
    if value is None or isinstance(value, str):
        return [value] * (n * per_prompt)
    if len(value) != n:
        raise ValueError(f"{what}: {len(value)} values for {n} prompts")
    return [v for v in value for _ in range(per_prompt)]


class GuardedPipeline:
    """A pipeline whose every call is checked and repaired by a `Guard`; called as the pipeline is.
    `last_outcomes` holds what was done for each image of the last call."""

    def __init__(self, pipeline: Any, guard: Guard):
        self.pipeline, self.guard = pipeline, guard
        self.last_outcomes: list[ImageOutcome] = []

    def __getattr__(self, name: str) -> Any:  # components, config, ... as the pipeline has them
        return getattr(self.pipeline, name)

    def __call__(self, prompt: str | list[str] | None = None, **kwargs: Any) -> Any:
        if prompt is None or "prompt_embeds" in kwargs:
            raise ValueError("the guard regenerates from prompts: pass `prompt`, not `prompt_embeds`")
        output_type = kwargs.pop("output_type", "pil")
        return_dict = kwargs.pop("return_dict", True)
        if output_type == "latent":
            raise ValueError("the guard checks decoded images: output_type 'latent' cannot be guarded")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = kwargs.pop("num_images_per_prompt", 1) or 1
        n = len(prompts) * per_prompt
        negatives = _per_image(kwargs.pop("negative_prompt", None), len(prompts), per_prompt, "negative_prompt")
        generator = kwargs.pop("generator", None)
        if generator is None:  # seeds the guard knows, so a retry or a fallback can name them
            seeds = torch.randint(0, 2**63 - 1, (n,)).tolist()
            generator = [torch.Generator().manual_seed(s) for s in seeds]
        generators = generator if isinstance(generator, list) else [generator] * n
        if len(generators) != n:
            raise ValueError(f"generator: {len(generators)} generators for {n} images")
        seeds = [g.initial_seed() for g in generators]
        per_image = [p for p in prompts for _ in range(per_prompt)]

        def make(pipe: Any, indices: list[int] | None, seeds_now: list[int] | None) -> torch.Tensor:
            if indices is None:
                call = dict(prompt=prompts, negative_prompt=negatives[::per_prompt], generator=generator)
                call["num_images_per_prompt"] = per_prompt
            else:
                assert seeds_now is not None
                gens = [
                    torch.Generator(device=generators[i].device).manual_seed(s)
                    for i, s in zip(indices, seeds_now, strict=True)
                ]
                call = dict(prompt=[per_image[i] for i in indices], generator=gens)
                call["negative_prompt"] = [negatives[i] for i in indices]
            if all(v is None for v in call["negative_prompt"]):
                call.pop("negative_prompt")
            latents = pipe(**call, **kwargs, output_type="latent").images
            return decode_latents(pipe, latents)

        def regenerate(source: str, indices: list[int], seeds_now: list[int]) -> torch.Tensor:
            on_failure = self.guard.on_failure
            pipe = on_failure.pipeline if isinstance(on_failure, Fallback) else self.pipeline
            return make(pipe, indices, seeds_now)

        raw, self.last_outcomes = self.guard.repair(make(self.pipeline, None, None), per_image, seeds, regenerate)
        images = self.pipeline.image_processor.postprocess(raw * 2 - 1, output_type=output_type)
        if not return_dict:
            return (images,)
        from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

        return StableDiffusion3PipelineOutput(images=images)


def guarded(
    pipeline: Any,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    on_failure: RetryPolicy | None = None,
    *,
    thresholds: dict[str, dict[str, Any]] | None = None,
    on_event: Callable[[GuardEvent], None] | None = None,
    mlflow: bool = False,
) -> GuardedPipeline:
    """`pipeline` behind a guard: `detectors` check every image (thresholds as a suite's
    `detector_thresholds`); `on_failure` (default `Reseed(max_tries=2)`) makes flagged ones again."""
    return GuardedPipeline(pipeline, Guard(detectors, on_failure, thresholds, on_event, mlflow))
