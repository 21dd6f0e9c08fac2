"""``python -m training.controlnet_judge [--controlnet imagen/data/demo/controlnet]``: does the demo ControlNet
draw the shape where its silhouette is? Judged by meaning, on silhouettes it never saw, and printed as a table.

Every picture is drawn by diffusers' ``StableDiffusionXLControlNetPipeline.from_pipe`` of the demo model
(:func:`training.train_demo.load_trained_pipeline`) at 1024 px with the demo model's guidance as far as that
pipeline takes it: 7.5, stopped after 60 % of the steps (``DEMO_GUIDANCE_STOP``, the service's way: a step
callback that keeps the prompt's half of every doubled tensor, here the control images too), and no guidance
rescale (the ControlNet pipeline takes none). ``--guidance-stop 1`` guides to the end instead. The prompts name
the colour and the background only: "a red shape on a white background" ("shape" is a word the demo model never
saw). The silhouettes (white on black, drawn at 256 px: the pipeline resizes them) are of
(shape, position, size) combinations the training never showed in any place
(:func:`training.train_controlnet.held_out_silhouettes`), half of them moved off the five positions and zoomed
(:func:`training.train_controlnet.move_shape`, kept reading as their held-out combination).

Figures (:func:`run`):

* **IoU:** the drawn shape's pixels (those at least half way from the background to the shape's colour, as
  :func:`training.judge.judge` reads them) against the silhouette's; the share of pictures at 0.6 or more
  (bar: 80 %), and the mean. The same without the ControlNet (the plain pipeline), for scale.
* **Colour:** the judge's colour is the prompt's (bar: 90 %); and the background.
* **Scale 0:** ``controlnet_conditioning_scale=0`` against the plain pipeline, same seed: the latents, which
  should be the same to the bit.
* **Late start:** ``control_guidance_start`` 0.7: the mean IoU falls.
* **Two units:** the same ControlNet twice (diffusers' ``MultiControlNetModel``), two silhouettes in two
  places: each shape's IoU (within the half of the picture nearer to its silhouette) at 0.5 or more.

For speed (under a second a picture on one CPU thread) a picture is read at 256 px from the latents: three
bilinear doublings of the cell colours, which is what the demo VAE's decoder computes before its last two
nearest-neighbour doublings to 1024 px (:func:`decode_256`), and the ControlNet's conditioning embedding,
a pure function of the control image that the pipeline recomputes at 1024 px on every step, is computed once
per call (:func:`embedding_once_per_call`). Both are checked against the plain way on one picture (rows
"decode_256" and "embedding once").
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from scipy import ndimage

from imagen.registry.builtin import DEMO_CONTROLNET_DIR, DEMO_GUIDANCE_STOP
from imagen.registry.demo_model import DEMO_MODEL_DIR, LATENT_SCALE
from training import shapes
from training.judge import Verdict, judge
from training.train_controlnet import (
    SHAPE_WORD,
    cell_coverage,
    held_out_silhouettes,
    load_controlnet,
    move_shape,
    read_place,
    silhouette_of,
)
from training.train_demo import TrainingSettings, cell_means, load_trained_pipeline

SIZE = 1024
"""The pictures' size: the demo model draws 32 x 32 latents (it was never trained at another size)."""
READ_SIZE = 256
STEPS = 16
GUIDANCE = 7.5
IOU_BAR = 0.6
IOU_SHARE_BAR = 0.8
COLOUR_BAR = 0.9
LATE_START = 0.7
TWO_UNIT_BAR = 0.5

Mask = npt.NDArray[np.bool_]


@dataclasses.dataclass(frozen=True)
class Case:
    scene: shapes.Scene
    silhouette: Image.Image
    seed: int
    moved: bool

    @property
    def prompt(self) -> str:
        return prompt_for(self.scene)


def prompt_for(scene: shapes.Scene) -> str:
    return f"a {scene.colour} {SHAPE_WORD} on a {scene.background} background"


def held_out_cases(count: int, seed: int, settings: TrainingSettings) -> list[Case]:
    """``count`` pictures to draw: a held-out silhouette each (in turn), on the five positions' grid (even
    cases) or moved and zoomed (odd cases), with a drawable colour and background drawn from ``seed``."""
    triples = held_out_silhouettes(settings.held_out_seed + 19, settings.controlnet_held_out_per_shape)
    rng = np.random.default_rng(seed)
    pairs = [(c, b) for c in shapes.COLOURS for b in shapes.BACKGROUNDS if shapes.drawable(c, b)]
    cases = []
    for i in range(count):
        shape, position, size = triples[i % len(triples)]
        colour, background = pairs[int(rng.integers(len(pairs)))]
        scene = shapes.Scene(shape, colour, background, position, size)
        picture = shapes.render(scene, READ_SIZE, rng)
        moved = False
        if i % 2:
            for _ in range(200):
                candidate = move_shape(picture, shapes.BACKGROUNDS[background], rng, settings.controlnet_zoom)
                assert candidate is not None
                if read_place(cell_coverage(cell_means(candidate[0]), scene)) == (position, size):
                    picture, moved = candidate[0], True
                    break
        cases.append(Case(scene, silhouette_of(picture, scene), seed * 1000 + i, moved))
    return cases


def two_unit_cases() -> list[tuple[shapes.Scene, shapes.Scene]]:
    """Pairs of small shapes in two places, the same colour and background (one prompt)."""
    pairs = (
        ("circle", "on the left", "square", "on the right", "red", "white"),
        ("triangle", "at the top", "star", "at the bottom", "blue", "beige"),
        ("square", "on the left", "circle", "at the top", "yellow", "navy"),
        ("star", "on the right", "triangle", "at the bottom", "black", "sky blue"),
    )
    return [
        (shapes.Scene(a, colour, background, pa, "small"), shapes.Scene(b, colour, background, pb, "small"))
        for a, pa, b, pb, colour, background in pairs
    ]


# ---------------------------------------------------------------- drawing


def decode_256(latents: torch.Tensor) -> Image.Image:
    """The picture at 256 px of one latent: its cell colours doubled three times bilinearly, but by nearest
    neighbour on the outer ring of pixels, which is what the demo VAE's decoder draws
    (:func:`training.demo_architecture._set_smoothing`) before doubling twice more by nearest neighbour to
    1024 px."""
    rgb = latents[:1, :3].float() / LATENT_SCALE
    for _ in range(3):
        near = torch.nn.functional.interpolate(rgb, scale_factor=2, mode="nearest")
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False)
        for edge in (0, -1):
            rgb[..., edge, :] = near[..., edge, :]
            rgb[..., :, edge] = near[..., :, edge]
    pixels = ((rgb[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels, "RGB")


class _OncePerCall(torch.nn.Module):
    """A ControlNet's conditioning embedding that computes each control image (tensor) once."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        for tensor, embedded in self.seen:
            if tensor is condition:
                return embedded
        computed: torch.Tensor = self.inner(condition)
        self.seen.append((condition, computed))
        return computed


@contextmanager
def embedding_once_per_call(controlnet: Any) -> Iterator[None]:
    """While the block runs (one pipeline call), ``controlnet`` embeds each control image tensor once: the
    pipeline hands the same tensor to it on every step."""
    inner = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = _OncePerCall(inner)
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = inner


class Painter:
    """The demo model's plain and ControlNet pipelines (one set of components), drawing latents."""

    def __init__(
        self, model_dir: Path, controlnet_dir: Path, steps: int = STEPS, guidance_stop: float | None = None
    ) -> None:
        from diffusers import StableDiffusionXLControlNetPipeline

        self.plain = load_trained_pipeline(model_dir)
        self.controlnet = load_controlnet(controlnet_dir)
        self.controlnet.controlnet_cond_embedding.to(memory_format=torch.channels_last)  # 4x faster, same sums
        self.pipe = StableDiffusionXLControlNetPipeline.from_pipe(self.plain, controlnet=self.controlnet)
        self.pipe.set_progress_bar_config(disable=True)
        self.multi = StableDiffusionXLControlNetPipeline.from_pipe(
            self.plain, controlnet=[self.controlnet, self.controlnet]
        )
        self.multi.set_progress_bar_config(disable=True)
        self.steps = steps
        self.guidance_stop = guidance_stop

    def _common(self, pipe: Any, prompt: str, seed: int) -> dict[str, Any]:
        common = {
            "prompt": prompt, "num_inference_steps": self.steps, "guidance_scale": GUIDANCE, "height": SIZE,
            "width": SIZE, "output_type": "latent", "generator": torch.Generator().manual_seed(seed),
        }
        if self.guidance_stop is not None and self.guidance_stop < 1:
            from imagen.generation.diffusers.guidance import callback_inputs

            inputs = callback_inputs(pipe)
            if pipe is not self.plain and "image" not in inputs:
                inputs.append("image")
            common["callback_on_step_end"] = _stop_guidance_at(self.guidance_stop, self.steps)
            common["callback_on_step_end_tensor_inputs"] = inputs
        return common

    def plain_latents(self, prompt: str, seed: int) -> torch.Tensor:
        with torch.inference_mode():
            latents: torch.Tensor = self.plain(**self._common(self.plain, prompt, seed)).images
        return latents

    def controlled(
        self, prompt: str, seed: int, control: Image.Image | list[Image.Image], once: bool = True, **kwargs: Any
    ) -> torch.Tensor:
        pipe = self.multi if isinstance(control, list) else self.pipe
        with torch.inference_mode(), embedding_once_per_call(self.controlnet) if once else nullcontext():
            latents: torch.Tensor = pipe(image=control, **self._common(pipe, prompt, seed), **kwargs).images
        return latents


def _stop_guidance_at(stop: float, steps: int) -> Any:
    """The service's guidance stop (:mod:`imagen.generation.diffusers.guidance`) as a step callback, which
    also keeps the prompt's half of the ControlNet pipeline's control images (``image``)."""
    from imagen.generation.diffusers.guidance import guided_steps, stop_guidance

    cut = guided_steps(stop, steps)

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if step + 1 != cut or cut >= steps:
            return tensors
        image = tensors.pop("image", None)
        tensors = stop_guidance(pipe, tensors)
        if isinstance(image, list):
            tensors["image"] = [part.chunk(2)[1] for part in image]
        elif image is not None:
            tensors["image"] = image.chunk(2)[1]
        return tensors

    return callback


# ---------------------------------------------------------------- reading


def drawn_mask(picture: Image.Image, verdict: Verdict) -> Mask:
    """The pixels the judge counts as shape (at least half way from its background to its shape colour),
    every region of them (two units draw two)."""
    if verdict.colour_rgb is None:
        return np.zeros((picture.height, picture.width), dtype=bool)
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
    background = np.asarray(verdict.background_rgb, dtype=np.float64)
    half = 0.5 * float(np.linalg.norm(np.asarray(verdict.colour_rgb, dtype=np.float64) - background))
    mask: Mask = np.linalg.norm(pixels - background, axis=-1) > half
    return mask


def silhouette_mask(silhouette: Image.Image, size: int = READ_SIZE) -> Mask:
    grey = np.asarray(silhouette.convert("L").resize((size, size), Image.Resampling.BILINEAR))
    mask: Mask = grey >= 128
    return mask


def iou(a: Mask, b: Mask) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def nearer(a: Mask, b: Mask) -> tuple[Mask, Mask]:
    """The pixels nearer to ``a`` than to ``b``, and the others."""
    to_a = ndimage.distance_transform_edt(~a)
    to_b = ndimage.distance_transform_edt(~b)
    side: Mask = to_a <= to_b
    return side, ~side


@dataclasses.dataclass
class Reading:
    iou: float
    verdict: Verdict


def read(latents: torch.Tensor, silhouette: Image.Image) -> Reading:
    picture = decode_256(latents)
    verdict = judge(picture)
    return Reading(iou(drawn_mask(picture, verdict), silhouette_mask(silhouette)), verdict)


# ---------------------------------------------------------------- the figures


@dataclasses.dataclass
class Row:
    figure: str
    value: str
    bar: str = ""
    met: bool | None = None


def run(
    model_dir: Path = DEMO_MODEL_DIR, controlnet_dir: Path = DEMO_CONTROLNET_DIR, count: int = 40,
    subset: int = 20, seed: int = 1, steps: int = STEPS, guidance_stop: float | None = DEMO_GUIDANCE_STOP,
) -> list[Row]:
    """Draw and read everything; returns the table's rows (:func:`table` prints them)."""
    settings = TrainingSettings()
    started = time.monotonic()
    painter = Painter(model_dir, controlnet_dir, steps, guidance_stop)
    cases = held_out_cases(count, seed, settings)
    stop = "to the end" if guidance_stop is None or guidance_stop >= 1 else f"stopped at {guidance_stop:.0%}"
    rows: list[Row] = [Row(f"guidance {GUIDANCE}, {stop} of the steps, no rescale; {steps} steps, {SIZE} px", "")]

    # the fast ways, checked against the plain ones on the first case
    first = cases[0]
    fast = painter.controlled(first.prompt, first.seed, first.silhouette)
    slow = painter.controlled(first.prompt, first.seed, first.silhouette, once=False)
    rows.append(Row("embedding once: max |latent difference| vs every step", f"{_max_diff(fast, slow):.1e}"))
    with torch.inference_mode():
        decoded = painter.plain.vae.decode(fast / painter.plain.vae.config.scaling_factor).sample
    full = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    vae_256 = np.asarray(Image.fromarray(full, "RGB").resize((READ_SIZE, READ_SIZE), Image.Resampling.BOX))
    gap = np.abs(vae_256.astype(int) - np.asarray(decode_256(fast)).astype(int)).max()
    rows.append(Row("decode_256 vs the VAE at 1024 px (box to 256): max |pixel difference|", f"{gap}"))

    best = np.array([read(_cell_latents(c), c.silhouette).iou for c in cases])
    rows.append(Row("the silhouettes' own 32 x 32 cell colours (a latent's best): IoU >= 0.6 / mean",
                    f"{(best >= IOU_BAR).mean():.0%} / {best.mean():.3f}"))
    timer = time.monotonic()
    readings = [read(painter.controlled(c.prompt, c.seed, c.silhouette), c.silhouette) for c in cases]
    per_picture = (time.monotonic() - timer) / len(cases)
    ious = np.array([r.iou for r in readings])
    share = float((ious >= IOU_BAR).mean())
    rows.append(Row(f"IoU >= {IOU_BAR} (held-out silhouettes, {len(cases)} pictures)", f"{share:.0%}",
                    f">= {IOU_SHARE_BAR:.0%}", share >= IOU_SHARE_BAR))
    rows.append(Row("  mean IoU", f"{ious.mean():.3f}"))
    moved = np.array([c.moved for c in cases])
    rows.append(Row("  on the five positions / moved and zoomed: mean IoU",
                    f"{ious[~moved].mean():.3f} / {ious[moved].mean():.3f}" if moved.any() else "-"))
    colours = float(np.mean([r.verdict.colour == c.scene.colour for r, c in zip(readings, cases, strict=True)]))
    rows.append(Row("colour read = the prompt's", f"{colours:.0%}", f">= {COLOUR_BAR:.0%}", colours >= COLOUR_BAR))
    backgrounds = float(np.mean([r.verdict.background == c.scene.background
                                 for r, c in zip(readings, cases, strict=True)]))
    rows.append(Row("background read = the prompt's", f"{backgrounds:.0%}"))
    shapes_read = float(np.mean([r.verdict.shape == c.scene.shape for r, c in zip(readings, cases, strict=True)]))
    rows.append(Row("shape read = the silhouette's (not in the prompt)", f"{shapes_read:.0%}"))
    rows.append(Row(f"seconds a picture ({torch.get_num_threads()} thread(s), {steps} steps, read included)",
                    f"{per_picture:.2f}"))

    part = cases[:subset]
    base = np.array([read(painter.plain_latents(c.prompt, c.seed), c.silhouette).iou for c in part])
    rows.append(Row(f"without the ControlNet: mean IoU (first {len(part)})", f"{base.mean():.3f}",
                    f"< {ious[:subset].mean():.3f}", bool(base.mean() < ious[:subset].mean())))
    late = np.array([
        read(painter.controlled(c.prompt, c.seed, c.silhouette, control_guidance_start=LATE_START), c.silhouette).iou
        for c in part
    ])
    rows.append(Row(f"control_guidance_start {LATE_START}: mean IoU (first {len(part)})", f"{late.mean():.3f}",
                    f"< {ious[:subset].mean():.3f}", bool(late.mean() < ious[:subset].mean())))

    same = []
    for c in cases[:4]:
        zero = painter.controlled(c.prompt, c.seed, c.silhouette, controlnet_conditioning_scale=0.0)
        same.append(_max_diff(zero, painter.plain_latents(c.prompt, c.seed)))
    rows.append(Row("scale 0 vs the plain pipeline, same seed: max |latent difference| (4 pictures)",
                    f"{max(same):.1e}", "0 (identical)", max(same) == 0.0))

    both = []
    for i, (a, b) in enumerate(two_unit_cases()):
        rng = np.random.default_rng(seed * 7 + i)
        sil_a = silhouette_of(shapes.render(a, READ_SIZE, rng), a)
        sil_b = silhouette_of(shapes.render(b, READ_SIZE, rng), b)
        latents = painter.controlled(prompt_for(a), seed * 7 + i, [sil_a, sil_b])
        picture = decode_256(latents)
        drawn = drawn_mask(picture, judge(picture))
        mask_a, mask_b = silhouette_mask(sil_a), silhouette_mask(sil_b)
        side_a, side_b = nearer(mask_a, mask_b)
        both.append((iou(drawn & side_a, mask_a), iou(drawn & side_b, mask_b)))
    pair_ious = np.array(both)
    appear = float((pair_ious.min(axis=1) >= TWO_UNIT_BAR).mean())
    rows.append(Row(f"two units, two places: both shapes at IoU >= {TWO_UNIT_BAR} ({len(both)} pictures)",
                    f"{appear:.0%}", "100 %", appear == 1.0))
    rows.append(Row("  IoU of each shape", " ".join(f"{x:.2f}/{y:.2f}" for x, y in both)))
    rows.append(Row("minutes in all", f"{(time.monotonic() - started) / 60:.1f}"))
    return rows


def _cell_latents(case: Case) -> torch.Tensor:
    """The latent of the picture the prompt and the silhouette ask for: each cell the silhouette's coverage
    of the way from the background to the shape's colour."""
    from training.train_demo import to_latents

    grey = np.asarray(case.silhouette.convert("L"), dtype=np.float32) / 255
    cells = READ_SIZE // 32
    cover = grey.reshape(32, cells, 32, cells).mean(axis=(1, 3))
    colour, background = (np.asarray(rgb, dtype=np.float32) / 127.5 - 1 for rgb in
                          (shapes.COLOURS[case.scene.colour], shapes.BACKGROUNDS[case.scene.background]))
    means = background[:, None, None] + cover[None] * (colour - background)[:, None, None]
    return to_latents(torch.from_numpy(np.ascontiguousarray(means))[None])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def table(rows: Sequence[Row]) -> str:
    width = max(len(r.figure) for r in rows)
    lines = [f"{'figure':<{width}}  {'measured':>10}  {'bar':>14}  met", "-" * (width + 34)]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        lines.append(f"{r.figure:<{width}}  {r.value:>10}  {r.bar:>14}  {met}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.controlnet_judge")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--controlnet", type=Path, default=DEMO_CONTROLNET_DIR)
    parser.add_argument("--count", type=int, default=40, help="held-out pictures")
    parser.add_argument("--subset", type=int, default=20, help="of them, drawn again without it and late")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--guidance-stop", type=float, default=DEMO_GUIDANCE_STOP,
                        help="guidance for this share of the steps only (the demo model's: %(default)s); 1: to the end")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.model, args.controlnet, args.count, args.subset, args.seed, args.steps, args.guidance_stop)
    print(table(rows))
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
