"""The reference's trajectory at the recorded steps, and the candidate's transformer evaluated on it.

SD3's pipeline calls its transformer once per denoising step, on the latents twice over (unconditional
then conditional) when guidance is on, and combines the two halves: uncond + g * (cond - uncond). A
forward hook on the reference's transformer keeps, at the recorded steps, what went in and what the
guidance made of what came out. The candidate's transformer then sees exactly those inputs, so its
error at one step cannot feed the next (teacher forcing).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

STEP_TENSORS = ("latents", "timesteps", "guided", "prompt_embeds", "pooled")


@dataclass
class Trajectory:
    """A batch's reference trajectory at the recorded steps (batch first, on the CPU, float32)."""

    steps: tuple[int, ...]
    """Recorded step indices, ascending."""
    latents: torch.Tensor
    """(B, S, C, H, W): the latent entering each recorded step."""
    timesteps: torch.Tensor
    """(B, S): the scheduler's timestep at each recorded step."""
    guided: torch.Tensor
    """(B, S, C, H, W): the reference's model output after guidance."""
    prompt_embeds: torch.Tensor
    """(B, K, L, D): the transformer's text embeddings; K = 2 (unconditional, conditional) with
    guidance, 1 without."""
    pooled: torch.Tensor
    """(B, K, P): the pooled text embeddings, likewise."""
    guidance: float
    """The guidance scale the outputs were combined with."""
    input_dtype: torch.dtype = torch.float32
    """The dtype the pipeline passed the inputs in (they are kept in float32, which holds any of them)."""

    def __len__(self) -> int:
        return self.latents.shape[0]

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Sample `i`'s tensors, as the reference cache stores them."""
        return {name: getattr(self, name)[i].contiguous() for name in STEP_TENSORS}

    @classmethod
    def from_samples(
        cls, samples: list[dict[str, torch.Tensor]], steps: tuple[int, ...], guidance: float, input_dtype: torch.dtype
    ) -> Trajectory:
        stacked = {name: torch.stack([s[name] for s in samples]) for name in STEP_TENSORS}
        return cls(steps=steps, guidance=guidance, input_dtype=input_dtype, **stacked)

    @classmethod
    def cat(cls, parts: list[Trajectory]) -> Trajectory:
        """The trajectories of consecutive parts of one batch, as one."""
        first = parts[0]
        joined = {name: torch.cat([getattr(p, name) for p in parts]) for name in STEP_TENSORS}
        return cls(steps=first.steps, guidance=first.guidance, input_dtype=first.input_dtype, **joined)


def _guided(output: torch.Tensor, guidance: float, batch: int) -> torch.Tensor:
    out = output.float()
    if out.shape[0] == batch:  # no guidance: one half only
        return out
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def _halves(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """(K*B, ...) as the pipeline passes it -> (B, K, ...)."""
    k = tensor.shape[0] // batch
    return tensor.reshape(k, batch, *tensor.shape[1:]).transpose(0, 1)


@contextmanager
def recording(transformer: Any, steps: tuple[int, ...], guidance: float, batch: int) -> Iterator[list[Trajectory]]:
    """Record the trajectory of ONE pipeline call of `batch` images on `transformer`; the list it
    yields holds the Trajectory once the call has finished (empty if the call made no step)."""
    calls: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
    count = [0]
    dtype = [torch.float32]
    wanted = set(steps)

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        step = count[0]
        count[0] += 1
        if step not in wanted:
            return
        if args:
            raise RuntimeError("step error expects the pipeline to call its transformer with keyword arguments")
        result = output[0] if isinstance(output, tuple) else output.sample
        dtype[0] = kwargs["hidden_states"].dtype
        inputs = {
            k: kwargs[k].detach().float().cpu()
            for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
        }
        calls.append((inputs, _guided(result.detach(), guidance, batch).cpu()))

    out: list[Trajectory] = []
    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()
    if not calls:
        return
    if count[0] <= max(steps):
        raise RuntimeError(f"the pipeline made {count[0]} transformer calls; steps {list(steps)} were to be recorded")
    first = calls[0][0]
    out.append(
        Trajectory(
            steps=steps,
            latents=torch.stack([c[0]["hidden_states"][:batch] for c in calls], dim=1),
            timesteps=torch.stack([c[0]["timestep"][:batch] for c in calls], dim=1),
            guided=torch.stack([c[1] for c in calls], dim=1),
            prompt_embeds=_halves(first["encoder_hidden_states"], batch),
            pooled=_halves(first["pooled_projections"], batch),
            guidance=guidance,
            input_dtype=dtype[0],
        )
    )


@dataclass
class StepErrors:
    """A candidate's teacher-forced errors on one batch: (B, S) each."""

    relative: torch.Tensor
    """||out_cand - out_ref|| / ||out_ref|| of the guided outputs, per sample and recorded step."""
    cosine: torch.Tensor
    """Cosine similarity of the guided outputs, per sample and recorded step."""
    first: torch.Tensor | None = None
    """The candidate's own output at step 0, when that step is recorded (its generation starts from
    these very inputs, so `answered_first` can give it back instead of computing it again)."""


def step_inputs(traj: Trajectory, s: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The transformer's keyword arguments at recorded step `s`, as the pipeline passed them (in the
    dtype it passed them in)."""
    k = traj.prompt_embeds.shape[1]

    def stacked(t: torch.Tensor) -> torch.Tensor:  # (B, K, ...) -> (K*B, ...)
        return t.transpose(0, 1).reshape(-1, *t.shape[2:])

    latents = traj.latents[:, s]
    dtype = traj.input_dtype
    return {
        "hidden_states": torch.cat([latents] * k).to(device, dtype),
        "timestep": torch.cat([traj.timesteps[:, s]] * k).to(device),
        "encoder_hidden_states": stacked(traj.prompt_embeds).to(device, dtype),
        "pooled_projections": stacked(traj.pooled).to(device, dtype),
    }


@torch.inference_mode()
def teacher_forced(transformer: Any, traj: Trajectory) -> StepErrors:
    """The candidate's transformer on the reference's inputs at every recorded step, compared with
    the reference's guided output there. The transformer casts its inputs where its dtype differs
    (evals.models.precision); the comparison is made in float64 on the CPU. The output at step 0,
    when recorded, is kept (`StepErrors.first`) for `answered_first`."""
    device = next(transformer.parameters()).device
    batch = len(traj)
    relative, cosine = [], []
    first = None
    for s in range(len(traj.steps)):
        output = transformer(**step_inputs(traj, s, device), return_dict=False)[0]
        first = output if traj.steps[s] == 0 else first
        guided = _guided(output, traj.guidance, batch)
        cand = guided.double().cpu().flatten(1)
        ref = traj.guided[:, s].double().flatten(1)
        diff = (cand - ref).norm(dim=1)
        relative.append(diff / ref.norm(dim=1))
        cosine.append(torch.nn.functional.cosine_similarity(cand, ref, dim=1))
    return StepErrors(torch.stack(relative, dim=1).float(), torch.stack(cosine, dim=1).float(), first)


@contextmanager
def answered_first(transformer: Any, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> Iterator[None]:
    """While the block runs, the transformer's first call, if made with exactly `inputs` (keyword
    arguments as the pipeline passes them), returns `output` instead of computing it: screening has
    computed the candidate's first step on the reference's inputs, which are its own first inputs
    too. Any other first call (another batch size, a changed text encoder) runs as usual."""
    inner = transformer.__dict__.get("forward")  # a wrapper of the instance's own (evals.graphed), or none
    launched = inner if inner is not None else transformer.forward
    asked = [False]

    def forward(*args: Any, **kwargs: Any) -> Any:
        first, asked[0] = not asked[0], True
        given = {k: kwargs.get(k) for k in inputs}
        same = first and not args and kwargs.get("return_dict") is False
        same = same and all(torch.is_tensor(v) and v.shape == inputs[k].shape for k, v in given.items())
        if same and all(torch.equal(v.cpu(), inputs[k]) for k, v in given.items()):  # type: ignore[union-attr]
            return (output.to(kwargs["hidden_states"].device).clone(),)
        return launched(*args, **kwargs)

    transformer.forward = forward
    try:
        yield
    finally:
        if inner is not None:
            transformer.forward = inner
        else:
            del transformer.forward
