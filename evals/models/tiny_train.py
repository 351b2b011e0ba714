"""Train the tiny CI model: `python -m evals.models.tiny_train --out evals/models/weights/tiny-sd3.safetensors`.

Seeded and self-contained: the data are the captioned scenes of `evals/models/tiny_data.py`, rendered here
(no download). Two phases, on one GPU in about 7 minutes (6.8 on an H200):

1. the VAE (16 latent channels, 4x down-sampling) learns to reconstruct the scenes (L1 + a little
   KL, so its latents stay smooth enough to be generated);
2. the transformer and both CLIP text encoders learn together, by rectified flow on the VAE's
   normalized latents, as SD3 was trained: x_t = (1 - s) x_0 + s e, the model predicts e - x_0 at
   timestep 1000 s. One caption in ten is dropped (the empty prompt, as classifier-free guidance
   uses), and the T5 stand-in (zeros) is mostly `T5_TOKENS` long, sometimes longer.

The weights kept are an exponential moving average; they are saved in float16 (the model runs in
float32 or lower; float16 halves the committed file) with the VAE's latent shift and scale in the
file's metadata. The script prints the file's sha256: record it as `WEIGHTS_SHA256` in tiny.py.
GPU kernels are not bit-deterministic, so a retrain gives a model of the same quality, not the
same bytes; inference from the committed file is bit-reproducible.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evals.models.tiny import T5_TOKENS, TINY_VERSION, TRAINED, build_tiny_components, weights_sha256
from evals.models.tiny_data import render

CHUNK = 2048


def _render_chunk(args: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    seed, n = args
    torch.set_num_threads(1)
    images, captions = render(n, torch.Generator().manual_seed(seed))
    return ((images + 1) * 127.5).round().to(torch.uint8), captions


def render_dataset(size: int, seed: int, workers: int) -> tuple[torch.Tensor, list[str]]:
    """`size` scenes as uint8 (N, 3, 64, 64), rendered in chunks whose seeds derive from `seed`."""
    jobs = [(seed * 1_000_003 + i, min(CHUNK, size - i * CHUNK)) for i in range(math.ceil(size / CHUNK))]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    return torch.cat([p[0] for p in parts]), [c for p in parts for c in p[1]]


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Token ids as the SD3 pipeline makes them (max length 77, padded), each distinct caption once."""
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(unique)}
    return ids[torch.tensor([row[c] for c in captions])]


def encode_text(encoders: list[Any], ids: torch.Tensor, t5_tokens: int, joint_dim: int) -> tuple[torch.Tensor, ...]:
    """The pipeline's `encode_prompt` without T5, from token ids (tested against it in
    tests/test_tiny_model.py): penultimate hidden states of both CLIPs side by side, zeros for T5."""
    hidden, pooled = [], []
    for encoder in encoders:
        out = encoder(ids, output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2])
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    zeros = clip.new_zeros(clip.shape[0], t5_tokens, joint_dim)
    return torch.cat([clip, zeros], dim=-2), torch.cat(pooled, dim=-1)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train_vae(vae: Any, images: torch.Tensor, steps: int, batch: int, g: torch.Generator, log_every: int) -> None:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 1e-3, 200)
        idx = torch.randint(len(images), (batch,), generator=g, device=images.device)
        x = images[idx].float() / 127.5 - 1
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        recon = recon.float()
        rec = (recon - x).abs().mean() + 0.5 * (recon.diff(dim=-1) - x.diff(dim=-1)).abs().mean()
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
        loss = rec + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            psnr = -10 * math.log10(F.mse_loss((recon + 1) / 2, (x + 1) / 2).item())
            elapsed = time.time() - start
            print(f"vae {step:6d}  rec {rec.item():.4f}  kl {kl.item():.3f}  psnr {psnr:.1f} dB  {elapsed:.0f} s")
    vae.eval()


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (bf16, to keep the data set on the GPU)."""
    means, stds = [], []
    for part in images.split(4096):
        posterior = vae.encode(part.float() / 127.5 - 1).latent_dist
        means.append(posterior.mean.bfloat16())
        stds.append(posterior.std.bfloat16())
    return torch.cat(means), torch.cat(stds)


def train_denoiser(
    parts: dict[str, Any], latents: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, empty: torch.Tensor,
    factors: tuple[float, float], args: argparse.Namespace, g: torch.Generator,
) -> None:  # fmt: skip
    """Rectified-flow training of the transformer and text encoders, which end with their EMA weights."""
    modules = {k: parts[k] for k in ("transformer", "text_encoder", "text_encoder_2")}
    params = [p for m in modules.values() for p in m.parameters()]
    for m in modules.values():
        m.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    averaged = [p.detach().clone() for p in params]
    shift, scale = factors
    mean, std = latents
    joint = parts["transformer"].config.joint_attention_dim
    for step in range(args.steps):
        if time.time() > args.deadline:
            print(f"flow: stopped at step {step} of {args.steps}: the --minutes budget is spent")
            break
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.steps, args.lr, 300)
        idx = torch.randint(len(mean), (args.batch,), generator=g, device=mean.device)
        x0 = (
            (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=g, device=mean.device))
            - shift
        ) * scale
        tokens = ids[idx]
        drop = torch.rand(args.batch, generator=g, device=mean.device) < 0.1
        tokens = torch.where(drop[:, None], empty[None, :], tokens)
        t5 = T5_TOKENS if torch.rand((), generator=g, device=mean.device).item() < 0.75 else 77
        u = torch.rand(args.batch, generator=g, device=mean.device)
        shifted = torch.rand(args.batch, generator=g, device=mean.device) < 0.5
        sigma = torch.where(shifted, 3 * u / (1 + 2 * u), u).clamp(1e-3, 1.0)
        noise = torch.randn(x0.shape, generator=g, device=mean.device)
        xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        with torch.autocast(mean.device.type, dtype=torch.bfloat16):
            context, pooled = encode_text([parts["text_encoder"], parts["text_encoder_2"]], tokens, t5, joint)
            pred = parts["transformer"](
                hidden_states=xt, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma * 1000,
                return_dict=False,
            )[0]  # fmt: skip
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - decay)
        if step % args.log_every == 0 or step == args.steps - 1:
            lr, elapsed = opt.param_groups[0]["lr"], time.time() - args.started
            print(f"flow {step:6d}  loss {loss.item():.4f}  lr {lr:.2e}  {elapsed:.0f} s")
    with torch.no_grad():
        for p, a in zip(params, averaged, strict=True):
            p.copy_(a)
    for m in modules.values():
        m.eval()


def save(path: Path, parts: dict[str, Any], meta: dict[str, str]) -> str:
    from safetensors.torch import save_file

    tensors = {}
    for name in TRAINED:
        for key, value in parts[name].state_dict().items():
            value = value.detach().cpu()
            tensors[f"{name}.{key}"] = (value.half() if value.is_floating_point() else value).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return weights_sha256(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("evals/models/weights/tiny-sd3.safetensors"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=int, default=100_000, help="scenes rendered once and sampled from")
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3200, help="transformer + text encoder steps")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=14.0, help="stop the transformer's training at this wall time")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--workers", type=int, default=max(1, min(14, (multiprocessing.cpu_count() or 2) - 2)))
    p.add_argument("--log-every", type=int, default=1000)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(
            "training needs a CUDA GPU (7 minutes on an H200); `--device cpu` with few steps only checks the script"
        )
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = args.started = time.time()
    args.deadline = started + args.minutes * 60
    images, captions = render_dataset(args.data, args.seed, args.workers)
    print(f"rendered {len(images)} scenes ({len(set(captions))} distinct captions) in {time.time() - started:.0f} s")
    parts = build_tiny_components(args.seed)
    ids = tokenize(parts["tokenizer"], captions).to(args.device)
    empty = tokenize(parts["tokenizer"], [""])[0].to(args.device)
    images = images.to(args.device)
    g = torch.Generator(args.device).manual_seed(args.seed)
    for name in TRAINED:
        parts[name].to(args.device)
    train_vae(parts["vae"], images, args.vae_steps, args.vae_batch, g, args.log_every)
    mean, std = encode_latents(parts["vae"], images)
    shift = mean.float().mean().item()
    scale = 1.0 / math.sqrt(((mean.float() - shift) ** 2).mean().item() + (std.float() ** 2).mean().item())
    print(f"latent shift {shift:.4f}  scale {scale:.4f}  ({time.time() - started:.0f} s)")
    train_denoiser(parts, (mean, std), ids, empty, (shift, scale), args, g)
    meta = {
        "format": TINY_VERSION,
        "vae_shift_factor": repr(shift),
        "vae_scaling_factor": repr(scale),
        "training": json.dumps({k: str(v) for k, v in vars(args).items() if k not in ("started", "deadline")}),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "minutes": f"{(time.time() - started) / 60:.1f}",
    }
    digest = save(args.out, parts, meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {(time.time() - started) / 60:.1f} min")
    print(f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
