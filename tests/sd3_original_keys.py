"""Test helper: a diffusers SD3 transformer state dict -> original SD3 (MMDiT) key names, as
ComfyUI-style single files use them. The inverse of diffusers' own converter, checked against it."""

from __future__ import annotations

import torch


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def to_original_keys(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    rename = {
        "pos_embed.pos_embed": "pos_embed",
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "context_embedder": "context_embedder",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "proj_out": "final_layer.linear",
    }
    for new, old in rename.items():
        if new == "pos_embed.pos_embed":
            out[old] = sd[new]
            continue
        for p in ("weight", "bias"):
            out[f"{old}.{p}"] = sd[f"{new}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap_halves(sd[f"norm_out.linear.{p}"])
    for i in range(num_layers):
        b, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            out[f"{x}.attn.qkv.{p}"] = torch.cat([sd[f"{b}.attn.to_{n}.{p}"] for n in "qkv"])
            out[f"{c}.attn.qkv.{p}"] = torch.cat([sd[f"{b}.attn.add_{n}_proj.{p}"] for n in "qkv"])
            out[f"{x}.attn.proj.{p}"] = sd[f"{b}.attn.to_out.0.{p}"]
            out[f"{x}.adaLN_modulation.1.{p}"] = sd[f"{b}.norm1.linear.{p}"]
            context_ada = sd[f"{b}.norm1_context.linear.{p}"]
            out[f"{c}.adaLN_modulation.1.{p}"] = swap_halves(context_ada) if last else context_ada
            out[f"{x}.mlp.fc1.{p}"] = sd[f"{b}.ff.net.0.proj.{p}"]
            out[f"{x}.mlp.fc2.{p}"] = sd[f"{b}.ff.net.2.{p}"]
            if not last:
                out[f"{c}.attn.proj.{p}"] = sd[f"{b}.attn.to_add_out.{p}"]
                out[f"{c}.mlp.fc1.{p}"] = sd[f"{b}.ff_context.net.0.proj.{p}"]
                out[f"{c}.mlp.fc2.{p}"] = sd[f"{b}.ff_context.net.2.{p}"]
            if f"{b}.attn2.to_q.{p}" in sd:
                out[f"{x}.attn2.qkv.{p}"] = torch.cat([sd[f"{b}.attn2.to_{n}.{p}"] for n in "qkv"])
                out[f"{x}.attn2.proj.{p}"] = sd[f"{b}.attn2.to_out.0.{p}"]
        for new, old in (
            ("norm_q", "x_block.attn.ln_q"),
            ("norm_k", "x_block.attn.ln_k"),
            ("norm_added_q", "context_block.attn.ln_q"),
            ("norm_added_k", "context_block.attn.ln_k"),
        ):
            out[f"joint_blocks.{i}.{old}.weight"] = sd[f"{b}.attn.{new}.weight"]
        if f"{b}.attn2.norm_q.weight" in sd:
            out[f"{x}.attn2.ln_q.weight"] = sd[f"{b}.attn2.norm_q.weight"]
            out[f"{x}.attn2.ln_k.weight"] = sd[f"{b}.attn2.norm_k.weight"]
    assert len(out) <= len(sd), "every original tensor comes from a diffusers one"
    return out
