"""Diagnosis: why the demo model follows colour words and not shape or position words.

1. **What the text conditioning tells apart.** For one caption, swap one word (or phrase) at a time and print
   how far the conditioning the UNet receives moves: the per-token hidden states of both text encoders (what
   cross-attention reads) and the pooled embedding (what joins the time embedding), as the training encodes
   them. Then the norm of each word's row in both token tables (they start at zero before training).
2. **Where the picture's layout comes from at the noisiest steps.** For 24 training-style pictures (2 shapes x
   3 colours x 4 positions, large, on white), the UNet's estimate of the clean latents at timesteps 999 to 600,
   from (a) what training feeds it, the noised picture (SDXL's schedule keeps sqrt(alpha_bar) = 0.068 of it
   at t = 999; a zero-terminal-SNR one nothing), and (b) pure noise, which is what sampling starts from.
   Printed: the correlation of the estimate's layout (each channel less its spatial mean) with the true one.
   For the SDXL-schedule model it was high for (a) and near zero for (b): the model read where the shape is
   and what it looks like from the faint picture left in its input, not from the caption. A model trained
   with a zero terminal SNR cannot: at t = 999 (a) and (b) are the same input.
3. **Whether a position word moves the shape.** From pure noise, the centre of the red in the UNet's mean
   clean-picture estimate for "a large red circle <position> on a white background", for each position
   word, against where the training pictures put it.
4. **How much a shape word changes the picture.** From pure noise, how far the UNet's mean clean-picture
   estimate for "a large red <shape> in the center on a white background" moves when the shape word changes
   (every pair of the four shapes), against how far apart the mean training pictures of those captions are,
   and the size of the picture itself: the whole signal a shape word carries, at 32 x 32 latents.

    .venv/bin/python -m training.diagnose [--caption "..."] [--model OUT/model]   # from the repository root
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagen.generation.diffusers.loading import load_pipeline
from imagen.registry.builtin import DEMO_MODEL_ID, builtin_registry
from training import shapes
from training.train_demo import (
    NoiseSchedule,
    TextEncoding,
    cell_means,
    load_trained_pipeline,
    time_ids,
    to_latents,
)

SWAPS = (
    ("background", "white", "navy"),
    ("colour", "red", "blue"),
    ("size", "large", "small"),
    ("shape", "circle", "square"),
    ("shape", "circle", "star"),
    ("position", "on the left", "on the right"),
    ("position", "on the left", "at the top"),
)
WORDS = ("white", "navy", "red", "blue", "large", "small", "circle", "square", "star", "triangle",
         "left", "right", "top", "bottom", "center")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caption", default="a large red circle on the left on a white background")
    parser.add_argument("--model", type=Path, help="a model folder from training.train_demo (default: the shipped one)")
    args = parser.parse_args()
    if args.model is None:
        spec = builtin_registry().model(DEMO_MODEL_ID)
        assert spec is not None
        pipe = load_pipeline(spec, torch.float32)
    else:
        pipe = load_trained_pipeline(args.model)
    encode = TextEncoding(pipe)

    def conditioning(caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            tokens, pooled = encode.encode([caption])
        return tokens[0], pooled[0]

    tokens, pooled = conditioning(args.caption)
    print(f"demo model, caption {args.caption!r}: |hidden states| {tokens.norm():.2f}, |pooled| {pooled.norm():.2f}\n")
    print("| word kind | swap | hidden states moved | pooled moved |")
    print("|---|---|---|---|")
    for kind, old, new in SWAPS:
        assert old in args.caption, f"the caption has no {old!r}"
        other_tokens, other_pooled = conditioning(args.caption.replace(old, new))
        moved, pooled_moved = (other_tokens - tokens).norm(), (other_pooled - pooled).norm()
        print(f"| {kind} | {old} -> {new} | {moved:.2f} | {pooled_moved:.3f} |")
    print("\n| word | token-table row norm (encoder 1, encoder 2) |")
    print("|---|---|")
    tables = [enc.get_input_embeddings().weight.detach() for enc in (pipe.text_encoder, pipe.text_encoder_2)]
    for word in WORDS:
        ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
        print(f"| {word} | " + ", ".join(f"{float(t[i].norm()):.3f}" for i in ids for t in tables) + " |")
    print()
    layout_probe(pipe, encode)
    print()
    position_probe(pipe, encode)
    print()
    shape_probe(pipe, encode)
    return 0


def _layout_correlation(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    a = estimate - estimate.mean(dim=(2, 3), keepdim=True)
    b = truth - truth.mean(dim=(2, 3), keepdim=True)
    per_picture = (a * b).sum(dim=(1, 2, 3)) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))
    return float(per_picture.mean())


def layout_probe(pipe: Any, encode: TextEncoding) -> None:
    unet = pipe.unet
    scenes = [
        shapes.Scene(shape, colour, "white", position, "large")
        for shape in ("circle", "square")
        for colour in ("red", "blue", "green")
        for position in ("on the left", "on the right", "at the top", "at the bottom")
    ]
    rng = np.random.default_rng(0)
    truth = to_latents(torch.from_numpy(np.stack([cell_means(shapes.render(s, 256, rng)) for s in scenes])))
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    schedule = NoiseSchedule(pipe.scheduler)
    print(f"layout of the UNet's clean-picture estimate vs the truth (correlation, mean of {len(scenes)} pictures)\n")
    print("| timestep | sqrt(alpha_bar) | from the noised picture (training) | from pure noise (sampling) |")
    print("|---|---|---|---|")
    with torch.no_grad():
        tokens, pooled = encode.encode([shapes.caption(s) for s in scenes])
        added = {"text_embeds": pooled, "time_ids": time_ids(len(scenes))}
        for step in (999, 900, 800, 600):
            alpha_bar = schedule.alphas_cumprod[step]
            t = torch.full((len(scenes),), step)
            row = []
            for noisy in (schedule.add_noise(truth, noise, t), noise):
                estimate = schedule.picture_estimate(noisy, unet(noisy, t, tokens, added_cond_kwargs=added).sample, t)
                row.append(_layout_correlation(estimate, truth))
            print(f"| {step} | {alpha_bar.sqrt():.3f} | {row[0]:.2f} | {row[1]:.2f} |")


POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")


def _red_centre(latents: torch.Tensor) -> tuple[float, float]:
    """(x, y) in [0, 1] of the mean of (n, 4, h, w) latents' red excess over green and blue."""
    mean = latents.mean(dim=0)
    red = (mean[0] - mean[1:3].mean(dim=0)).clamp(min=0)
    red = (red - red.mean()).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(red.shape[0]) + 0.5, torch.arange(red.shape[1]) + 0.5, indexing="ij")
    total = red.sum().clamp(min=1e-12)
    return float((red * xs).sum() / total / red.shape[1]), float((red * ys).sum() / total / red.shape[0])


def position_probe(pipe: Any, encode: TextEncoding, pictures: int = 16) -> None:
    """Where the shape goes, from pure noise, for each position word: the centre of the red in the UNet's mean
    clean-picture estimate for "a large red circle <position> on a white background" (0.5, 0.5 is the middle),
    against the centre of the training pictures for that caption."""
    schedule = NoiseSchedule(pipe.scheduler)
    noise = torch.randn((pictures, 4, 32, 32), generator=torch.Generator().manual_seed(2))
    rng = np.random.default_rng(0)
    print("where the shape goes from pure noise: centre (x, y) of the red in the UNet's mean clean-picture "
          f"estimate, {pictures} noises\n")
    print("| position word | training pictures | t = 999 | t = 900 | t = 800 |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for position in POSITIONS:
            scene = shapes.Scene("circle", "red", "white", position, "large")
            truth = _mean_truth(scene, pictures, rng)[None]
            tokens, pooled = encode.encode([shapes.caption(scene)] * pictures)
            added = {"text_embeds": pooled, "time_ids": time_ids(pictures)}
            cells = []
            for step in (999, 900, 800):
                t = torch.full((pictures,), step)
                predicted = pipe.unet(noise, t, tokens, added_cond_kwargs=added).sample
                x, y = _red_centre(schedule.picture_estimate(noise, predicted, t))
                cells.append(f"{x:.2f}, {y:.2f}")
            x, y = _red_centre(truth)
            print(f"| {position} | {x:.2f}, {y:.2f} | " + " | ".join(cells) + " |")


def _mean_truth(scene: shapes.Scene, pictures: int, rng: np.random.Generator) -> torch.Tensor:
    cells = np.stack([cell_means(shapes.render(scene, 256, rng)) for _ in range(pictures)])
    return to_latents(torch.from_numpy(cells)).mean(dim=0)


def shape_probe(pipe: Any, encode: TextEncoding, pictures: int = 16) -> None:
    """Distance of each shape's mean clean-picture estimate (from pure noise) from the circle's, and the same
    between the mean training pictures (``pictures`` jittered drawings each)."""
    schedule = NoiseSchedule(pipe.scheduler)
    noise = torch.randn((pictures, 4, 32, 32), generator=torch.Generator().manual_seed(3))
    rng = np.random.default_rng(0)
    estimates: dict[str, list[torch.Tensor]] = {}
    truths: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for shape in shapes.SHAPES:
            scene = shapes.Scene(shape, "red", "white", "in the center", "large")
            truths[shape] = _mean_truth(scene, pictures, rng)
            tokens, pooled = encode.encode([shapes.caption(scene)] * pictures)
            added = {"text_embeds": pooled, "time_ids": time_ids(pictures)}
            estimates[shape] = []
            for step in (999, 900, 800):
                t = torch.full((pictures,), step)
                predicted = pipe.unet(noise, t, tokens, added_cond_kwargs=added).sample
                estimates[shape].append(schedule.picture_estimate(noise, predicted, t).mean(dim=0))
    print("how far a shape word moves the picture: distance between two shapes' mean clean-picture estimates "
          f"(latents), {pictures} noises; |the circle's training picture| = {truths['circle'].norm():.1f}\n")
    print("| shape word | training pictures | t = 999 | t = 900 | t = 800 |")
    print("|---|---|---|---|---|")
    for one, other in itertools.combinations(shapes.SHAPES, 2):
        moved = [float((e - c).norm()) for e, c in zip(estimates[other], estimates[one], strict=True)]
        truth = float((truths[other] - truths[one]).norm())
        print(f"| {one} -> {other} | {truth:.2f} | " + " | ".join(f"{m:.2f}" for m in moved) + " |")


if __name__ == "__main__":
    sys.exit(main())
