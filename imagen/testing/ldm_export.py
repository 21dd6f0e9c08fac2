"""Diffusers → original (StabilityAI "sgm" / civitai) key layout for SDXL, the inverse of diffusers' loader.

Used to write single-file checkpoints and kohya LoRA names for the tiny test fixtures, so that loading them
goes through diffusers' real ``from_single_file`` conversion. Works for any SDXL-shaped UNet configuration
(number of blocks, ``layers_per_block``), not only the real sizes.
"""

from __future__ import annotations

import re
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
REFINER_TE_PREFIX = "conditioner.embedders.0.model."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def unet_module_to_ldm(name: str, config: dict[str, Any]) -> str:
    """Map a diffusers UNet module/parameter name (``down_blocks.1.attentions.0...``) to the sgm name."""
    per_block = int(config["layers_per_block"])
    for new, old in _UNET_FIXED.items():
        if name == new or name.startswith(new + "."):
            return old + name[len(new) :]
    match = re.match(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(\.(.*))?$", name
    )
    if match:
        kind, block, part, index, rest = (match[1], int(match[2]), match[3], int(match[4]), match[6] or "")
        if kind == "down":
            base = 1 + block * (per_block + 1)
            if part == "resnets":
                return _join(f"input_blocks.{base + index}.0", _resnet_rest(rest))
            if part == "attentions":
                return _join(f"input_blocks.{base + index}.1", rest)
            return _join(f"input_blocks.{base + per_block}.0.op", rest.removeprefix("conv."))
        base = block * (per_block + 1)
        if part == "resnets":
            return _join(f"output_blocks.{base + index}.0", _resnet_rest(rest))
        if part == "attentions":
            return _join(f"output_blocks.{base + index}.1", rest)
        has_attention = str(config["up_block_types"][block]).startswith("CrossAttn")
        return _join(f"output_blocks.{base + per_block}.{2 if has_attention else 1}", rest)
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(\.(.*))?$", name)
    if match:
        part, index, rest = match[1], int(match[2]), match[4] or ""
        if part == "resnets":
            return _join(f"middle_block.{0 if index == 0 else 2}", _resnet_rest(rest))
        return _join("middle_block.1", rest)
    raise KeyError(f"no original-layout name for UNet key {name!r}")


def _join(head: str, rest: str) -> str:
    return f"{head}.{rest}" if rest else head


def _resnet_rest(rest: str) -> str:
    for new, old in _UNET_RESNET:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + unet_module_to_ldm(key, config): value for key, value in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    blocks = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
            lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}",
            new,
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
            lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample",
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, ldm in (
                ("group_norm", "norm"),
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ):
                new = new.replace(f"attn_1.{old}.", f"attn_1.{ldm}.")
            if value.ndim == 2:
                value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L (first text encoder): the transformers keys under the sgm prefix."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith("text_model.") else "text_model." + key
        out[TE1_PREFIX + name] = value
    return out


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str = TE2_PREFIX) -> dict[str, torch.Tensor]:
    """OpenCLIP bigG (SDXL base's second text encoder, the refiner's only one: ``REFINER_TE_PREFIX``): fused
    q/k/v, transposed projection, OpenCLIP names."""
    source = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {
        "positional_embedding": source.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": source.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": source.pop("final_layer_norm.weight"),
        "ln_final.bias": source.pop("final_layer_norm.bias"),
        "text_projection": source.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted({int(k.split(".")[2]) for k in source if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [source.pop(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = source.pop(src + f"self_attn.out_proj.{kind}")
            out[dst + f"ln_1.{kind}"] = source.pop(src + f"layer_norm1.{kind}")
            out[dst + f"ln_2.{kind}"] = source.pop(src + f"layer_norm2.{kind}")
            out[dst + f"mlp.c_fc.{kind}"] = source.pop(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.c_proj.{kind}"] = source.pop(src + f"mlp.fc2.{kind}")
    if source:
        raise KeyError(f"unconverted OpenCLIP keys: {sorted(source)[:5]}")
    return {prefix + key: value for key, value in out.items()}
