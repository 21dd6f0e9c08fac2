"""The demo model's architecture: real SDXL components, sized for a CPU, and a VAE set by hand.

* **Text encoders:** SDXL's two CLIP encoders (the second with a projection for the pooled embedding), narrow
  (8 and 16 wide) and two layers deep, with the real 49,408-token vocabulary. Their token tables start at
  zero, so the words training never sees stay at zero (and the file stays small once compressed).
* **UNet:** ``UNet2DConditionModel`` with SDXL's text-time conditioning, three levels (32, 16 and 8 latent
  cells at 1024 px), cross-attention on the two lower ones.
* **VAE:** an ``AutoencoderKL`` with six levels (32x), whose weights are not learned but set here so that
  a latent is exactly the 32 x 32 mean of the image's RGB plus its luminance
  (:mod:`imagen.registry.demo_model`). A trained small VAE loses absolute colour: the GroupNorm
  before its output takes out each image's mean. Here every GroupNorm on the main path sees its signal
  channels in +/- pairs next to a large constant pair (``+K``, ``-K``): the group mean is exactly zero and
  its spread is ``K`` to within ``1e-4``, so the norm is a fixed scale that the norm's own weight undoes.
  The residual branches are identities (conv2 = 0) and the downsampling convs exact 2 x 2 means. The decoder
  doubles by nearest neighbour, and after each of the first three doublings a residual block adds a bilinear
  smoothing (:func:`_set_smoothing`), gated off on the picture's outer pixels where the conv's zero padding
  would darken it: edges come out as smooth one-cell ramps, not 32 px steps (the last two doublings, to
  1024 px, leave 4 px steps on those ramps, which the eye does not see). Decoding is set, not learned: a
  decoder trained on top of this one (residual branches, L1 on crops) did not beat it in the time it had.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from imagen.generation.diffusers.components import clip_text_config, load_clip_tokenizers, sdxl_scheduler
from imagen.registry.demo_model import LATENT_DOWNSCALE, LATENT_SCALE, LUMA

IMAGE_SIZE = 1024
TEXT_WIDTHS = (8, 16)
POOLED_WIDTH = 16
TIME_EMBED_WIDTH = 8
VAE_CHANNELS = (8, 8, 16, 16, 16, 16)  # six levels: five 2x steps = LATENT_DOWNSCALE
CONSTANT = 64.0
"""``K``: the constant channels that make every main-path GroupNorm a fixed scale."""
LINEAR_SHIFT = 20.0
"""Added before a SiLU so that it passes its input through unchanged (``silu(x + 20) = x + 20`` to 1e-7)."""
GATE = 20.0
"""``B``: a smoothing correction ``d`` is gated by ``silu(d + G) - silu(G)`` with ``G = B`` (open) or <= -B."""
GATE_CONSTANT = 2000.0
"""``K'``: the constant pair beside the gate channels, so that the GroupNorm on them is a fixed scale too."""
SMOOTH_LEVELS = 3
"""Upsampling steps (of five) followed by a bilinear smoothing: 32 -> 64 -> 128 -> 256 px; then nearest."""

assert 2 ** (len(VAE_CHANNELS) - 1) == LATENT_DOWNSCALE


def unet_config() -> dict[str, Any]:
    return {
        "sample_size": IMAGE_SIZE // LATENT_DOWNSCALE,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64, 80),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4, 4),
        "norm_num_groups": 16,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED_WIDTH,
        "transformer_layers_per_block": 1,
        "projection_class_embeddings_input_dim": TIME_EMBED_WIDTH * 6 + POOLED_WIDTH,
        "cross_attention_dim": sum(TEXT_WIDTHS),
    }


def _text_config(hidden: int, projection: int, act: str) -> CLIPTextConfig:
    return clip_text_config(hidden, 2, projection, act, mlp_ratio=4, heads=2)


def vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        "up_block_types": ("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        "block_out_channels": VAE_CHANNELS,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 1,
        "sample_size": IMAGE_SIZE,
        "scaling_factor": LATENT_SCALE,
        "mid_block_add_attention": False,
    }


def _zero(module: torch.nn.Module) -> None:
    for parameter in module.parameters():
        torch.nn.init.zeros_(parameter)


def _set_identity_1x1(conv: torch.nn.Conv2d, pairs: dict[int, int] | None = None) -> None:
    """A 1x1 (or the centre tap of a k x k) conv copying input channel j to output channel i."""
    weight = torch.zeros_like(conv.weight)
    centre = conv.kernel_size[0] // 2
    count = min(conv.in_channels, conv.out_channels)
    for out_c, in_c in (pairs or {c: c for c in range(count)}).items():
        weight[out_c, in_c, centre, centre] = 1.0
    conv.weight.data.copy_(weight)
    if conv.bias is not None:
        conv.bias.data.zero_()


def _residuals_to_identity(module: torch.nn.Module) -> None:
    """Every ResnetBlock2D's residual branch outputs zero (conv2 = 0); its shortcut, if any, keeps channels."""
    from diffusers.models.resnet import ResnetBlock2D

    for block in module.modules():
        if isinstance(block, ResnetBlock2D):
            _zero(block.conv2)
            if block.conv_shortcut is not None:
                _set_identity_1x1(block.conv_shortcut)


def _set_norm_out(norm: torch.nn.GroupNorm, signal_channels: int, group_channels: int) -> None:
    """Undo the fixed scale ``K * sqrt(2 / group_channels)`` on the signal channels and shift them by
    :data:`LINEAR_SHIFT` so that the SiLU after the norm passes them through."""
    scale = CONSTANT * (2.0 / group_channels) ** 0.5
    norm.weight.data.zero_()
    norm.bias.data.zero_()
    norm.weight.data[:signal_channels] = scale
    norm.bias.data[:signal_channels] = LINEAR_SHIFT


def set_vae_by_hand(vae: Any) -> None:
    """Make ``vae`` encode to the exact 32 x 32 mean colour + luminance and decode by nearest neighbour."""
    encoder, decoder = vae.encoder, vae.decoder
    with torch.no_grad():
        # Encoder: conv_in -> [r, g, b, l, 0 ...]; the first widening shortcut adds the negatives
        # and the constant pair: [r, g, b, l, -r, -g, -b, -l, K, -K, 0 ...]; later ones keep channels.
        _zero(encoder.conv_in)
        for c in range(3):
            encoder.conv_in.weight.data[c, c, 1, 1] = 1.0
            encoder.conv_in.weight.data[3, c, 1, 1] = LUMA[c]
        _residuals_to_identity(encoder)
        widen = next(b.resnets[0].conv_shortcut for b in encoder.down_blocks if b.resnets[0].conv_shortcut)
        _zero(widen)
        for c in range(4):
            widen.weight.data[c, c, 0, 0] = 1.0
            widen.weight.data[4 + c, c, 0, 0] = -1.0
        widen.bias.data[8] = CONSTANT
        widen.bias.data[9] = -CONSTANT
        for block in encoder.down_blocks:
            if block.downsamplers is not None:
                conv = block.downsamplers[0].conv  # pads right/bottom by 1, then 3x3 stride 2: a 2x2 mean
                _zero(conv)
                for c in range(conv.in_channels):
                    conv.weight.data[c, c, :2, :2] = 0.25
        last = VAE_CHANNELS[-1]
        _set_norm_out(encoder.conv_norm_out, 8, last)
        _zero(encoder.conv_out)
        for c in range(4):  # mean_c = (silu(c + s) - silu(-c + s)) / 2 = c
            encoder.conv_out.weight.data[c, c, 1, 1] = 0.5
            encoder.conv_out.weight.data[c, 4 + c, 1, 1] = -0.5
            encoder.conv_out.bias.data[4 + c] = -30.0  # log-variance: no sampling noise
        _set_identity_1x1(vae.quant_conv)

        # Decoder: conv_in -> [r, g, b, -r, -g, -b, K, -K, 0 ...] (luminance unused); the narrowing
        # shortcuts keep the first channels; upsampling = nearest doubling + identity conv.
        _set_identity_1x1(vae.post_quant_conv)
        _zero(decoder.conv_in)
        for c in range(3):
            decoder.conv_in.weight.data[c, c, 1, 1] = 1.0
            decoder.conv_in.weight.data[3 + c, c, 1, 1] = -1.0
        decoder.conv_in.bias.data[6] = CONSTANT
        decoder.conv_in.bias.data[7] = -CONSTANT
        _residuals_to_identity(decoder)
        for block in decoder.up_blocks:
            if block.upsamplers is not None:
                _set_identity_1x1(block.upsamplers[0].conv)
        for block in decoder.up_blocks[1 : 1 + SMOOTH_LEVELS]:
            _set_smoothing(block.resnets[0])
        _set_norm_out(decoder.conv_norm_out, 6, VAE_CHANNELS[0])
        _zero(decoder.conv_out)
        for c in range(3):
            decoder.conv_out.weight.data[c, c, 1, 1] = 0.5
            decoder.conv_out.weight.data[c, 3 + c, 1, 1] = -0.5


def _set_smoothing(block: Any) -> None:
    """Make a decoder ResnetBlock2D (16 channels in and out, just after a nearest-neighbour doubling) add
    ``blur(x) - x`` to the colours, with the [1, 2, 1] x [1, 2, 1] / 16 kernel: nearest doubling then this
    blur is exactly bilinear doubling. On the picture's outer row and column the blur would read the conv's
    zero padding, so there the correction is gated off (those pixels stay as doubled):

    * norm1 + SiLU pass the colours (``x + s``) and the constant (as ``1 + s``) through, ``s`` = LINEAR_SHIFT;
    * conv1 makes, per colour, ``d + G`` and ``G`` (and their negatives, and ``+-K'`` for norm2), where
      ``d = blur(x + s) - (x + s)`` and ``G = 2B (mx + my) - 3B`` from the blurred constant: ``mx``, ``my`` are
      1 inside and 0 on the outer columns / rows, so ``G`` is ``B`` inside and ``-B`` or ``-3B`` on the edge;
    * norm2 + SiLU: ``silu(d + G)`` and ``silu(G)``; conv2 adds ``silu(d + G) - silu(G)`` = ``d`` inside, 0 on
      the edge, to each colour (and its negative to the negative channels).
    """
    channels = block.conv1.in_channels
    assert channels == block.conv1.out_channels == 16, "the smoothing needs 16 channels"
    passed = CONSTANT * (2.0 / channels) ** 0.5  # norm1's fixed scale
    norm1, conv1, norm2, conv2 = block.norm1, block.conv1, block.norm2, block.conv2
    for module in (norm1, conv1, norm2, conv2):
        _zero(module)
    for c in range(3):
        norm1.weight.data[c] = passed
        norm1.bias.data[c] = LINEAR_SHIFT
    norm1.weight.data[6] = passed / CONSTANT  # the +K channel, as 1 (+ shift)
    norm1.bias.data[6] = LINEAR_SHIFT
    one = 1.0 + LINEAR_SHIFT
    line = torch.tensor([0.25, 0.5, 0.25])
    blur = torch.outer(line, line)
    gate_scale = 2.0 * GATE / (0.25 * one)  # (blur_x(one) - 0.75 one) / (0.25 one) = mx
    w = conv1.weight.data
    for c in range(3):
        delta = blur.clone()
        delta[1, 1] -= 1.0
        w[c, c] = delta
        w[4 + c, c] = -delta
    for out, sign in ((list(range(4)), 1.0), (list(range(4, 8)), -1.0)):
        for o in out:
            w[o, 6, 1, :] += sign * gate_scale * line  # blur_x of the constant
            w[o, 6, :, 1] += sign * gate_scale * line  # blur_y of the constant
            conv1.bias.data[o] = sign * -15.0 * GATE  # G = gate_scale (bx + by) - 15 B: B, -B, -3B
    conv1.bias.data[8] = GATE_CONSTANT
    conv1.bias.data[9] = -GATE_CONSTANT
    for c in range(4):
        norm2.weight.data[c] = GATE_CONSTANT * (2.0 / channels) ** 0.5
    for c in range(3):
        conv2.weight.data[c, c, 1, 1] = 1.0
        conv2.weight.data[c, 3, 1, 1] = -1.0
        conv2.weight.data[3 + c, c, 1, 1] = -1.0
        conv2.weight.data[3 + c, 3, 1, 1] = 1.0


ZERO_TERMINAL_SNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
"""The scheduler settings of a zero-terminal-SNR model (Lin et al., *Common Diffusion Noise Schedules and Sample
Steps Are Flawed*, 2023): SDXL's betas rescaled so that the noisiest step keeps nothing of the picture,
v-prediction, and sampling that starts from that step."""


def demo_scheduler(zero_terminal_snr: bool) -> Any:
    """SDXL's Euler scheduler, with :data:`ZERO_TERMINAL_SNR` or as SDXL has it."""
    sdxl = sdxl_scheduler()
    if not zero_terminal_snr:
        return sdxl
    return EulerDiscreteScheduler.from_config(sdxl.config, **ZERO_TERMINAL_SNR)  # type: ignore[no-untyped-call]


def build_untrained_pipeline(seed: int, zero_terminal_snr: bool = True) -> Any:
    """The demo pipeline before training: random UNet, zero token tables, the hand-set VAE, and its scheduler
    (:func:`demo_scheduler`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet: Any = UNet2DConditionModel(**unet_config())  # type: ignore[no-untyped-call]
        torch.manual_seed(seed + 1)
        vae: Any = AutoencoderKL(**vae_config())  # type: ignore[no-untyped-call]
        set_vae_by_hand(vae)
        torch.manual_seed(seed + 2)
        text_encoder: Any = CLIPTextModel(_text_config(TEXT_WIDTHS[0], TEXT_WIDTHS[0], "quick_gelu"))
        torch.manual_seed(seed + 3)
        text_encoder_2: Any = CLIPTextModelWithProjection(_text_config(TEXT_WIDTHS[1], POOLED_WIDTH, "gelu"))
        for encoder in (text_encoder, text_encoder_2):
            torch.nn.init.zeros_(encoder.get_input_embeddings().weight)
    scheduler = demo_scheduler(zero_terminal_snr)
    tokenizer, tokenizer_2 = load_clip_tokenizers()
    return StableDiffusionXLPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
