"""A tiny ESRGAN upscaler (RRDBNet) in the Real-ESRGAN / BasicSR key layout, built in code for the tests.

``write_tiny_esrgan(folder, scale)`` writes ``tiny-esrgan-x{scale}.safetensors``: the keys and shapes of
``RealESRGAN_x4plus`` / ``RealESRGAN_x2plus`` (``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``,
``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``), so spandrel detects it as its ``ESRGAN``
architecture exactly as it does the files people download, only with one RRDB block and a few feature
channels. As in BasicSR, the network always upsamples 4x internally; the 2x (and 1x) variants first
pixel-unshuffle the input (12 or 48 input channels), which spandrel reads back as scale 2 (or 1, a
"Restoration" model, useful to test that a non-upscaler is refused).

The weights are not trained: they make the network close to a nearest-neighbour upscale (the colour
channels pass through the convolutions' centre taps) plus a small, spatially varying, deterministic
perturbation from random weights, so the output is a recognisable picture that depends on each pixel's
neighbourhood (which is what makes tiled-versus-untiled comparisons meaningful).

Spandrel 0.4.2 builds every RRDB with a growth of 32 channels whatever the file holds (``gc=32`` is not
read from the weights), so the dense blocks cannot be made smaller than that; the file is saved in
float16 (as many published ``.safetensors`` upscalers are) to stay at about 0.45 MB.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

NUM_FEAT = 8
NUM_BLOCK = 1
# Fixed by spandrel's ESRGAN architecture (and the default of every published RRDBNet).
NUM_GROW_CH = 32
# How much the dense blocks change the picture (the trunk's last convolution, relative to 1/sqrt(fan-in)):
# about 14/255 on average from a nearest-neighbour upscale, enough for tile edges to matter.
BODY_STD = 0.3
_UNSHUFFLE = {4: 1, 2: 2, 1: 4}


def _conv(
    generator: torch.Generator, out_ch: int, in_ch: int, std: float, identity: dict[int, list[int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3x3 convolution's weight and bias: random with ``std``, plus centre taps of 1/len(sources) that copy
    (or average) the input channels listed for each output channel in ``identity``."""
    weight = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * std
    for out_index, sources in (identity or {}).items():
        for in_index in sources:
            weight[out_index, in_index, 1, 1] += 1.0 / len(sources)
    bias = torch.randn(out_ch, generator=generator) * std * 0.1
    return weight, bias


def tiny_esrgan_state_dict(scale: int = 4, seed: int = 0, num_feat: int = NUM_FEAT) -> dict[str, torch.Tensor]:
    """The float32 state dict ``write_tiny_esrgan`` saves (BasicSR RRDBNet keys)."""
    if scale not in _UNSHUFFLE:
        raise ValueError(f"scale must be one of {sorted(_UNSHUFFLE)}, not {scale}")
    if num_feat < 3:
        raise ValueError("num_feat must be at least 3 (the colour channels travel in the first three)")
    shuffle = _UNSHUFFLE[scale]
    in_ch = 3 * shuffle * shuffle
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def put(name: str, conv: tuple[torch.Tensor, torch.Tensor]) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = conv

    # pixel_unshuffle puts colour c's sub-pixels at channels c*shuffle²..c*shuffle²+shuffle²-1: average them.
    colours = {c: [c * shuffle * shuffle + k for k in range(shuffle * shuffle)] for c in range(3)}
    put("conv_first", _conv(generator, num_feat, in_ch, 0.01, colours))
    for block in range(NUM_BLOCK):
        for rdb in (1, 2, 3):
            for index in range(1, 6):
                out_ch = num_feat if index == 5 else NUM_GROW_CH
                in_ch_rdb = num_feat + (index - 1) * NUM_GROW_CH  # dense: each conv sees all before it
                # 1/sqrt(fan-in) keeps activations at the input's scale through the dense connections
                put(f"body.{block}.rdb{rdb}.conv{index}", _conv(generator, out_ch, in_ch_rdb, (in_ch_rdb * 9) ** -0.5))
    put("conv_body", _conv(generator, num_feat, num_feat, BODY_STD * (num_feat * 9) ** -0.5))
    # The upsampling path passes every channel through its centre tap; its random part stays tiny, since
    # the noise of four convolutions in a row adds up.
    everything = {c: [c] for c in range(num_feat)}
    put("conv_up1", _conv(generator, num_feat, num_feat, 0.003, everything))
    put("conv_up2", _conv(generator, num_feat, num_feat, 0.003, everything))
    put("conv_hr", _conv(generator, num_feat, num_feat, 0.003, everything))
    put("conv_last", _conv(generator, 3, num_feat, 0.003, {c: [c] for c in range(3)}))
    return state


def write_tiny_esrgan(folder: Path, scale: int = 4, seed: int = 0) -> Path:
    """Write ``tiny-esrgan-x{scale}.safetensors`` (scale 4, 2 or 1) into ``folder`` and return its path.

    Deterministic for a given ``scale`` and ``seed``; float16 tensors, as many published upscalers are.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tiny-esrgan-x{scale}.safetensors"
    state = {key: value.to(torch.float16).contiguous() for key, value in tiny_esrgan_state_dict(scale, seed).items()}
    # One metadata key only: safetensors writes several in a random order, and the bytes should not change.
    save_file(state, str(path), metadata={"format": "pt"})
    return path
