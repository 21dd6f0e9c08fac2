"""SDXL building blocks that need no download: the shipped configs and CLIP tokenizers, tiny random models.

* ``imagen/data/sdxl-base/`` holds the public SDXL base 1.0 component configs (diffusers layout, JSON only):
  what ``from_single_file`` needs to turn an original-layout checkpoint into a pipeline.
* ``imagen/data/clip-tokenizer/`` holds CLIP's BPE vocabulary (49408 tokens), shared by both SDXL tokenizers.
* :func:`build_tiny_sdxl_pipeline` builds an SDXL-architecture pipeline with tiny random weights from a
  fixed seed: the test fixtures (the demo model is trained: :mod:`imagen.registry.demo_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
SDXL_CONFIG_DIR = DATA_DIR / "sdxl-base"
SDXL_REFINER_CONFIG_DIR = DATA_DIR / "sdxl-refiner"
CLIP_TOKENIZER_DIR = DATA_DIR / "clip-tokenizer"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


def load_clip_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two tokenizers: same BPE vocabulary; the second (OpenCLIP bigG) pads with ``!``."""
    vocab = str(CLIP_TOKENIZER_DIR / "vocab.json")
    merges = str(CLIP_TOKENIZER_DIR / "merges.txt")
    common: dict[str, Any] = {
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    tokenizer = CLIPTokenizer(vocab, merges, pad_token="<|endoftext|>", **common)
    tokenizer_2 = CLIPTokenizer(vocab, merges, pad_token="!", **common)
    return tokenizer, tokenizer_2


@dataclass(frozen=True)
class TinySdxlShape:
    """Sizes of a tiny SDXL-architecture model. The two text encoders get different widths on purpose:
    diffusers' single-file loader tells them apart by their width, as it does for real SDXL (768 / 1280)."""

    unet_channels: tuple[int, ...] = (32, 64)
    unet_down: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    unet_up: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    unet_heads: tuple[int, ...] = (2, 4)
    unet_norm_groups: int = 32
    unet_layers_per_block: int = 2
    vae_channels: tuple[int, ...] = (32, 32, 32, 32)
    vae_norm_groups: int = 32
    vae_layers_per_block: int = 1
    vae_mid_attention: bool = True
    text_hidden: int = 32
    text_hidden_2: int = 64
    text_projection_2: int = 32
    text_layers: int = 2
    time_embed_dim: int = 8
    size: int = 64


FIXTURE_SHAPE = TinySdxlShape()


def clip_text_config(
    hidden: int, layers: int, projection: int, act: str, *, mlp_ratio: int = 2, heads: int = 4
) -> CLIPTextConfig:
    """A narrow CLIP text encoder's config with the real vocabulary and context length."""
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=hidden * mlp_ratio,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        layer_norm_eps=1e-5,
        max_position_embeddings=CLIP_MAX_LENGTH,
        vocab_size=CLIP_VOCAB_SIZE,
        projection_dim=projection,
        hidden_act=act,
    )


def _tiny_unet(shape: TinySdxlShape, cross_attention_dim: int, time_ids: int) -> Any:
    """An SDXL-architecture UNet of ``shape``'s sizes (drawn from the global RNG: callers seed it)."""
    return UNet2DConditionModel(  # type: ignore[no-untyped-call]
        sample_size=shape.size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers_per_block,
        down_block_types=shape.unet_down,
        up_block_types=shape.unet_up,
        attention_head_dim=shape.unet_heads,
        norm_num_groups=shape.unet_norm_groups,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=shape.time_embed_dim,
        transformer_layers_per_block=1,
        projection_class_embeddings_input_dim=shape.time_embed_dim * time_ids + shape.text_projection_2,
        cross_attention_dim=cross_attention_dim,
    )


def build_tiny_sdxl_pipeline(shape: TinySdxlShape, seed: int = 0) -> Any:
    """A real ``StableDiffusionXLPipeline`` with random weights drawn from ``seed`` (global RNG untouched)."""
    pooled_dim = shape.text_projection_2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(shape, cross_attention_dim=shape.text_hidden + shape.text_hidden_2, time_ids=6)
        torch.manual_seed(seed + 1)
        vae: Any = AutoencoderKL(  # type: ignore[no-untyped-call]
            block_out_channels=shape.vae_channels,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels),
            latent_channels=4,
            layers_per_block=shape.vae_layers_per_block,
            norm_num_groups=shape.vae_norm_groups,
            sample_size=shape.size,
            scaling_factor=0.13025,
            mid_block_add_attention=shape.vae_mid_attention,
        )
        torch.manual_seed(seed + 2)
        text_encoder: Any = CLIPTextModel(
            clip_text_config(shape.text_hidden, shape.text_layers, shape.text_hidden, "quick_gelu")
        )
        torch.manual_seed(seed + 3)
        text_encoder_2: Any = CLIPTextModelWithProjection(
            clip_text_config(shape.text_hidden_2, shape.text_layers, pooled_dim, "gelu")
        )
    scheduler = sdxl_scheduler()
    tokenizer, tokenizer_2 = load_clip_tokenizers()
    return StableDiffusionXLPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_refiner_pipeline(base: Any, shape: TinySdxlShape, seed: int = 0) -> Any:
    """A tiny SDXL *refiner* (``StableDiffusionXLImg2ImgPipeline``, ``requires_aesthetics_score``): the second
    text encoder and the VAE of ``base`` (as SDXL's refiner shares them with SDXL base), a UNet of its own that
    reads that encoder alone and five time ids (sizes, crop and the aesthetic score)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # the refiner's UNet reads the second encoder alone, and five time ids (the aesthetic score for two)
        unet = _tiny_unet(shape, cross_attention_dim=shape.text_hidden_2, time_ids=5)
    return StableDiffusionXLImg2ImgPipeline(  # type: ignore[no-untyped-call]
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet.eval(),
        scheduler=sdxl_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


def sdxl_scheduler() -> Any:
    """SDXL base's own scheduler (Euler, scaled linear betas, epsilon), from the shipped SDXL config."""
    return EulerDiscreteScheduler.from_pretrained(str(SDXL_CONFIG_DIR), subfolder="scheduler")  # type: ignore[no-untyped-call]
