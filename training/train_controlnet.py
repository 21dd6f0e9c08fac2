"""``python -m training.train_controlnet OUT [--model imagen/data/demo/model]``: a silhouette ControlNet for
the demo model, trained on a CPU (one thread) on top of the saved model, which stays frozen.

What it is: ``diffusers.ControlNetModel.from_unet`` of the demo UNet (its down and middle blocks copied, the
zero convolutions added), whose control image is the shape's **silhouette**: white shape on black, RGB, at the
picture's size, as ``StableDiffusionXLControlNetPipeline`` feeds it (3 channels in [0, 1], resized to the
output size). Its conditioning embedding downsamples by 32, as the demo VAE does (``LATENT_DOWNSCALE``): six
entries of :data:`EMBEDDING_CHANNELS`, five stride-2 stages, two channels each, so the pipeline works at any
size that is a multiple of 32.

The embedding is set by hand, not learned, except its last (zero) convolution: it computes, exactly, the
fraction of each latent cell that the silhouette covers, which is all a 32 x 32 latent of mean colours can
show of a shape (a cell's colour is that fraction of the way from the background to the shape's colour). It
carries each value ``x`` as the pair ``(silu(x), silu(-x))``, from which the next convolution takes ``x`` back
exactly (``silu(x) - silu(-x) = x``), and its stride-2 convolutions are 2 x 2 means
(:func:`set_embedding_by_hand`). It holds in fp16 and bf16 (no large offsets), and training needs no
silhouette at full size: the coverage of each cell is read from the training picture's own cell colours
(:func:`cell_coverage`), and the embedding's last convolution runs on it directly (:class:`CellEmbedding`; the
same numbers as the whole embedding on the silhouette, ``tests/test_controlnet_training.py``). Two channels
are as narrow as it gets, but diffusers runs the embedding at the picture's full size on every step: on one
CPU thread, 0.24 s a guided step at 1024 px (both halves; 0.05 s with the embedding's weights channels-last),
four times the rest of the step (the judge also computes it once per picture:
:func:`training.controlnet_judge.embedding_once_per_call`).

Data: scenes of the shapes language drawn as for the base model (:func:`training.train_demo.render_latents`'s
way, 256 px averaged to cells); ``controlnet_free_placement`` of them have their shape moved anywhere in the
picture and zoomed (:func:`move_shape`), and ``controlnet_two_shapes`` hold a second shape of the same colour,
whose silhouette goes through a second pass of the ControlNet, the two passes' residuals summed as diffusers'
``MultiControlNetModel`` sums two units' (:func:`two_units`; trained without them, two units in two places
drew neither shape in two pictures of the judge's four, guided to the end). A few (shape, position, size)
combinations, as the judge reads them (:func:`training.judge.position_word`, thirds; size by area), are never
shown (:func:`held_out_silhouettes`): :mod:`training.controlnet_judge` draws those. Captions always give the colour
and the background and, the silhouette deciding the rest, leave out the position and the size half of the
time, name the shape by the untrained word "shape" or another shape's name now and then, and sometimes
contradict the position or the size (:func:`controlnet_caption`); 10 % are dropped (``caption_dropout``).

Training: the base model's noise schedule, noise and weighted loss (:func:`training.train_demo.denoising_loss`),
the ControlNet's residuals added to the frozen UNet's, deterministic from the seed with one thread
(``controlnet_threads``). Saved as a diffusers folder in fp16: ``config.json`` and
``diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from imagen.registry.builtin import DEMO_CONTROLNET_DIR
from imagen.registry.demo_model import DEMO_MODEL_DIR, LATENT_DOWNSCALE
from training import shapes
from training.judge import position_word
from training.train_demo import (
    RENDER_SIZE,
    ControlResiduals,
    NoiseSchedule,
    Progress,
    ProgressFn,
    TextEncoding,
    TrainingSettings,
    _learning_rate,
    _print,
    cell_means,
    denoising_loss,
    load_trained_pipeline,
    optimise,
    sha256,
)

CONTROLNET_FOLDER = DEMO_CONTROLNET_DIR.name
"""``OUT/controlnet`` of ``python -m training.train_demo OUT``; shipped as ``imagen/data/demo/controlnet``."""
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
EMBEDDING_CHANNELS = (2, 2, 2, 2, 2, 2)
"""The conditioning embedding's widths: six entries, five stride-2 stages (32x), each value as a silu pair."""
GREY = (0.25, 0.5, 0.25)
"""The control image's RGB to one grey level (exact in fp16); a white on black silhouette gives its coverage."""
SHAPE_WORD = "shape"
"""What the judge's prompts call the shape; the base model never saw the word (its token is zero)."""
MARGIN = 0.02
"""A moved shape keeps this fraction of the picture's side from its edges."""

FloatArray = npt.NDArray[np.float32]
Triple = tuple[str, str, str]


# ---------------------------------------------------------------- silhouettes and cell coverage


def coverage(pixels: npt.NDArray[Any], colour: Sequence[float], background: Sequence[float]) -> FloatArray:
    """How far each pixel (or cell mean, ``(..., 3)``) is from ``background`` towards ``colour``, in [0, 1]: on
    an antialiased (or averaged) picture of one shape, the fraction of it the shape covers."""
    c, b = np.asarray(colour, dtype=np.float32), np.asarray(background, dtype=np.float32)
    direction = c - b
    along = (np.asarray(pixels, dtype=np.float32) - b) @ direction / float(direction @ direction)
    result: FloatArray = np.clip(along, 0.0, 1.0).astype(np.float32)
    return result


def cell_coverage(cells: npt.NDArray[Any], scene: shapes.Scene) -> FloatArray:
    """(h, w) coverage of each latent cell from :func:`training.train_demo.cell_means` of a picture of ``scene``."""
    to_unit = [[v / 127.5 - 1.0 for v in palette[name]] for palette, name in
               ((shapes.COLOURS, scene.colour), (shapes.BACKGROUNDS, scene.background))]
    return coverage(np.moveaxis(cells, 0, -1), to_unit[0], to_unit[1])


def silhouette_of(picture: Image.Image, scene: shapes.Scene) -> Image.Image:
    """The white on black silhouette (RGB) of ``picture``, a drawing of ``scene`` (its shape's colour and
    background), antialiased edges kept as grey."""
    alpha = coverage(np.asarray(picture.convert("RGB")), shapes.COLOURS[scene.colour],
                     shapes.BACKGROUNDS[scene.background])
    grey = np.round(alpha * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB")


def silhouette(scene: shapes.Scene, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """``scene``'s shape as :func:`training.shapes.render` draws it (same jitter from ``rng``), white on black."""
    return silhouette_of(shapes.render(scene, size, rng), scene)


Box = tuple[int, int, int, int]


def move_shape(
    picture: Image.Image, background: shapes.RGB, rng: np.random.Generator, zoom: float,
    onto: Image.Image | None = None, avoid: Box | None = None,
) -> tuple[Image.Image, Box] | None:
    """``picture`` (one shape on a plain ``background``) with its shape zoomed by a factor drawn from
    ``1 +- zoom`` (its area by the square) and put anywhere at least :data:`MARGIN` from the edges; with
    ``onto``, pasted on that picture instead of a plain one, clear of the box ``avoid`` (None: no room found).
    Returns the picture and the shape's box (left, top, right, bottom)."""
    pixels = np.asarray(picture, dtype=np.int16)
    ink = np.abs(pixels - np.asarray(background, dtype=np.int16)).max(axis=-1) > 0
    ys, xs = np.nonzero(ink)
    crop = picture.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    factor = float(rng.uniform(1 - zoom, 1 + zoom))
    side = picture.width
    margin = round(MARGIN * side)
    width = min(side - 2 * margin, max(2, round(crop.width * factor)))
    height = min(side - 2 * margin, max(2, round(crop.height * factor)))
    crop = crop.resize((width, height), Image.Resampling.BILINEAR)
    for _ in range(50):
        x = int(rng.integers(margin, side - margin - width + 1))
        y = int(rng.integers(margin, side - margin - height + 1))
        box = (x, y, x + width, y + height)
        if avoid is None or not (box[0] <= avoid[2] and avoid[0] <= box[2] and box[1] <= avoid[3]
                                 and avoid[1] <= box[3]):
            moved = onto.copy() if onto is not None else Image.new("RGB", picture.size, background)
            moved.paste(crop, (x, y))
            return moved, box
    return None


def read_place(cover: npt.NDArray[Any]) -> tuple[str, str]:
    """(position word, size word) of a coverage map, as :func:`training.judge.judge` reads a picture: the
    centre by thirds, the size by the area fraction."""
    total = float(cover.sum())
    rows, cols = cover.shape
    cy = float((cover.sum(axis=1) * (np.arange(rows) + 0.5)).sum()) / max(total, 1e-9) / rows
    cx = float((cover.sum(axis=0) * (np.arange(cols) + 0.5)).sum()) / max(total, 1e-9) / cols
    area = total / cover.size
    return position_word(cx, cy), "large" if area > shapes.SIZE_THRESHOLD else "small"


def held_out_silhouettes(seed: int, per_shape: int) -> list[Triple]:
    """(shape, position, size) combinations never shown in training: ``per_shape`` of each shape's ten."""
    rng = np.random.default_rng(seed)
    places = [(position, size) for position in shapes.POSITIONS for size in shapes.SIZES]
    held = []
    for shape in shapes.SHAPES:
        for i in sorted(int(i) for i in rng.permutation(len(places))[:per_shape]):
            held.append((shape, *places[i]))
    return held


# ---------------------------------------------------------------- the conditioning embedding


def set_embedding_by_hand(embedding: Any) -> None:
    """Make a ``ControlNetConditioningEmbedding`` of :data:`EMBEDDING_CHANNELS` compute, before its last
    convolution, ``(silu(c), silu(-c))`` of each latent cell's mean grey level ``c`` (:data:`GREY` of the
    control image): the convolution after each SiLU takes ``x = silu(x) - silu(-x)`` back, the stride-2 ones
    as 2 x 2 means (a 3 x 3 kernel at stride 2 with padding 1 reads rows ``2i-1 .. 2i+1``: taps 1 and 2 are
    the pair ``2i, 2i+1``). ``conv_out`` is left as it is (zero: trained)."""
    pair = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    with torch.no_grad():
        conv_in = embedding.conv_in
        conv_in.weight.zero_()
        conv_in.bias.zero_()
        for c, w in enumerate(GREY):
            conv_in.weight[0, c, 1, 1] = w
            conv_in.weight[1, c, 1, 1] = -w
        for index, conv in enumerate(embedding.blocks):
            conv.weight.zero_()
            conv.bias.zero_()
            if index % 2 == 0:  # same size: x back, as a pair
                conv.weight[:, :, 1, 1] = pair
            else:  # stride 2: the mean of x over 2 x 2, as a pair
                conv.weight[:, :, 1:3, 1:3] = 0.25 * pair[:, :, None, None]


class CellEmbedding(torch.nn.Module):
    """The embedding's last convolution on each cell's coverage ``(batch, 1, h, w)``: what the whole hand-set
    embedding gives for a silhouette whose cells have that coverage, without the silhouette (training)."""

    def __init__(self, conv_out: torch.nn.Conv2d) -> None:
        super().__init__()
        self.conv_out = conv_out

    def forward(self, cover: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([torch.nn.functional.silu(cover), torch.nn.functional.silu(-cover)], dim=1)
        out: torch.Tensor = self.conv_out(pair)
        return out


@contextmanager
def cells_as_condition(controlnet: Any) -> Iterator[None]:
    """While the block runs, ``controlnet`` takes cell coverage ``(batch, 1, h, w)`` as its ``controlnet_cond``."""
    embedding = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = CellEmbedding(embedding.conv_out)
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = embedding


def build_controlnet(unet: Any, seed: int) -> Any:
    """``ControlNetModel.from_unet(unet)`` with the hand-set embedding (:func:`set_embedding_by_hand`)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)
    set_embedding_by_hand(controlnet.controlnet_cond_embedding)
    return controlnet


def load_controlnet(folder: Path) -> Any:
    """A folder this command wrote, in float32."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(str(folder), dtype=torch.float32)  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------- data and captions


@dataclasses.dataclass(frozen=True)
class Sample:
    """A training picture: its scene (colour, background, shape), where the shape is, as read back, and
    whether a second shape (another silhouette, another ControlNet unit) is in it."""

    scene: shapes.Scene
    position: str
    size: str
    two: bool = False


RenderJob = tuple[shapes.Scene, int, bool, shapes.Scene | None, float, frozenset[Triple]]


def _render_sample(job: RenderJob) -> tuple[FloatArray, FloatArray, str, str, bool]:
    """Cell colours (3, h, w), each shape's cell coverage (2, h, w: the second all zero for one shape), the
    position and size words the first reads as, and whether there are two shapes. Moved shapes never read as
    a held-out combination (they are moved again)."""
    scene, seed, free, second, zoom, held = job
    rng = np.random.default_rng(seed)
    background = shapes.BACKGROUNDS[scene.background]
    picture = shapes.render(scene, RENDER_SIZE, rng)
    cells = cell_means(picture)
    cover = cell_coverage(cells, scene)
    if second is not None:
        other = shapes.render(second, RENDER_SIZE, rng)
        for _ in range(20):
            first = move_shape(picture, background, rng, zoom)
            assert first is not None
            both = move_shape(other, background, rng, zoom, onto=first[0], avoid=first[1])
            if both is None:
                continue
            first_cover = cell_coverage(cell_means(first[0]), scene)
            both_cells = cell_means(both[0])
            second_cover = np.clip(cell_coverage(both_cells, scene) - first_cover, 0.0, 1.0)
            if (scene.shape, *read_place(first_cover)) in held or (second.shape, *read_place(second_cover)) in held:
                continue
            place = read_place(first_cover)
            return both_cells, np.stack([first_cover, second_cover]), place[0], place[1], True
    place = read_place(cover)
    if free or second is not None:
        for _ in range(20):
            moved = move_shape(picture, background, rng, zoom)
            assert moved is not None
            moved_cells = cell_means(moved[0])
            moved_cover = cell_coverage(moved_cells, scene)
            moved_place = read_place(moved_cover)
            if (scene.shape, *moved_place) not in held:
                cells, cover, place = moved_cells, moved_cover, moved_place
                break
    return cells, np.stack([cover, np.zeros_like(cover)]), place[0], place[1], False


def controlnet_data(
    settings: TrainingSettings, report: ProgressFn
) -> tuple[list[Sample], torch.Tensor, torch.Tensor]:
    """The training samples, their latents ``(n, 4, h, w)`` and each shape's cell coverage ``(n, 2, h, w)``."""
    from training.train_demo import to_latents

    seed = settings.seed + 19
    held = frozenset(held_out_silhouettes(settings.held_out_seed + 19, settings.controlnet_held_out_per_shape))
    pool = shapes.scenes(seed, settings.controlnet_scenes * 2, settings.held_out_seed, settings.held_out)
    scenes = [s for s in pool if (s.shape, s.position, s.size) not in held][: settings.controlnet_scenes]
    rng = np.random.default_rng(seed)
    free = rng.random(len(scenes)) < settings.controlnet_free_placement
    two = rng.random(len(scenes)) < settings.controlnet_two_shapes
    partner = rng.integers(0, len(scenes), size=len(scenes))
    jobs: list[RenderJob] = [
        (scene, seed * 1_000_003 + i, bool(free[i]),
         dataclasses.replace(scenes[int(partner[i])], colour=scene.colour, background=scene.background)
         if two[i] else None,
         settings.controlnet_zoom, held)
        for i, scene in enumerate(scenes)
    ]
    report(f"ControlNet data: drawing {len(scenes)} scenes ({int(free.sum())} moved, {int(two.sum())} with two "
           f"shapes), {len(held)} silhouettes held out")
    results = [_render_sample(job) for job in jobs]
    samples = [Sample(scene, r[2], r[3], r[4]) for scene, r in zip(scenes, results, strict=True)]
    latents = to_latents(torch.from_numpy(np.stack([r[0] for r in results])))
    cover = torch.from_numpy(np.stack([r[1] for r in results]))
    return samples, latents, cover


def controlnet_caption(sample: Sample, rng: random.Random, settings: TrainingSettings) -> str:
    """The colour and the background always; the shape's name, "shape" (``controlnet_shape_word``) or another
    shape's (``controlnet_contradict``); the size and the position left out (``controlnet_drop_size``,
    ``controlnet_drop_position``; always with two shapes), else true or, ``controlnet_contradict`` of the
    time, another one."""

    def pick(true: str, others: Sequence[str], drop: float) -> str:
        if rng.random() < drop:
            return ""
        if rng.random() < settings.controlnet_contradict:
            return rng.choice([o for o in others if o != true])
        return true

    draw = rng.random()
    if draw < settings.controlnet_shape_word:
        shape = SHAPE_WORD
    elif draw < settings.controlnet_shape_word + settings.controlnet_contradict:
        shape = rng.choice([s for s in shapes.SHAPES if s != sample.scene.shape])
    else:
        shape = sample.scene.shape
    size = pick(sample.size, tuple(shapes.SIZES), 1.0 if sample.two else settings.controlnet_drop_size)
    position = pick(sample.position, tuple(shapes.POSITIONS), 1.0 if sample.two else settings.controlnet_drop_position)
    size = f"{size} " if size else ""
    position = f" {position}" if position else ""
    return f"a {size}{sample.scene.colour} {shape}{position} on a {sample.scene.background} background"


class FrozenTextEncoding(TextEncoding):
    """:class:`TextEncoding` of frozen encoders: each caption encoded once, without gradients, and kept."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({c for c in captions if c not in self.encoded})
        if missing:
            with torch.no_grad():
                embeds, pooled = super().encode(missing)
            for i, caption in enumerate(missing):
                self.encoded[caption] = (embeds[i], pooled[i])
        return (torch.stack([self.encoded[c][0] for c in captions]),
                torch.stack([self.encoded[c][1] for c in captions]))


# ---------------------------------------------------------------- training


def train_controlnet(
    model_dir: Path, out_dir: Path, settings: TrainingSettings, report: ProgressFn = _print
) -> dict[str, Any]:
    """Train the ControlNet on the saved model in ``model_dir`` (frozen) and save it in fp16 to ``out_dir``
    (``config.json``, ``diffusion_pytorch_model.safetensors``). Returns ``{"minutes", "sha256"}``. Torch's
    thread count (``controlnet_threads`` while it runs) and determinism flag are put back after it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(settings.controlnet_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(model_dir, out_dir, settings, report)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(model_dir: Path, out_dir: Path, settings: TrainingSettings, report: ProgressFn) -> dict[str, Any]:
    started = time.monotonic()
    seed = settings.seed + 19
    pipe = load_trained_pipeline(model_dir)
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
        module.eval()
    controlnet = build_controlnet(pipe.unet, seed)
    embedding = controlnet.controlnet_cond_embedding
    hand_set = {id(p) for m in (embedding.conv_in, embedding.blocks) for p in m.parameters()}
    trainable = [p for p in controlnet.parameters() if id(p) not in hand_set]
    for p in controlnet.parameters():
        p.requires_grad_(id(p) not in hand_set)
    samples, latents, cover = controlnet_data(settings, report)
    report(f"ControlNet: {sum(p.numel() for p in trainable)} trained parameters")
    optimizer = torch.optim.AdamW(trainable, lr=settings.controlnet_learning_rate, weight_decay=0.0)
    text = FrozenTextEncoding(pipe)
    schedule = NoiseSchedule(pipe.scheduler)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    phase = dataclasses.replace(settings, warmup_steps=settings.controlnet_warmup_steps,
                                batch=settings.controlnet_batch)

    def batch_loss() -> torch.Tensor:
        idx = [rng.randrange(len(samples)) for _ in range(phase.batch)]
        captions = [controlnet_caption(samples[i], rng, settings) for i in idx]
        keep = torch.tensor([rng.random() >= settings.caption_dropout for _ in idx])
        rows = torch.tensor([j for j, i in enumerate(idx) if samples[i].two], dtype=torch.long)
        return denoising_loss(pipe, text, schedule, latents[idx], captions, keep, phase, generator,
                              controlnet=two_units(controlnet, cover[idx], rows))

    controlnet.train()
    with cells_as_condition(controlnet):
        optimise(
            Progress("ControlNet", settings.controlnet_steps, report), optimizer, batch_loss,
            lambda step: _learning_rate(step, phase, settings.controlnet_steps, settings.controlnet_learning_rate),
            clip=trainable,
        )
    controlnet.eval()
    save_controlnet(controlnet, out_dir)
    minutes = (time.monotonic() - started) / 60
    digest = sha256(out_dir / WEIGHTS_FILE)
    report(f"ControlNet: {minutes:.1f} min, {out_dir / WEIGHTS_FILE} "
           f"({(out_dir / WEIGHTS_FILE).stat().st_size / 1e6:.2f} MB)")
    return {"minutes": round(minutes, 1), "sha256": digest}


def two_units(controlnet: Any, cover: torch.Tensor, rows: torch.Tensor) -> ControlResiduals:
    """The residuals of ``controlnet`` on each sample's first silhouette (``cover[:, :1]``), plus, for the
    samples ``rows`` (those with two shapes), its residuals on their second one: two units, summed as
    diffusers' ``MultiControlNetModel`` sums them."""

    def residuals(
        noisy: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict[str, Any]
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
        down, mid = controlnet(noisy, t, encoder_hidden_states=embeds, controlnet_cond=cover[:, :1],
                               added_cond_kwargs=added, return_dict=False)
        if len(rows):
            part = {name: value[rows] for name, value in added.items()}
            down_2, mid_2 = controlnet(noisy[rows], t[rows], encoder_hidden_states=embeds[rows],
                                       controlnet_cond=cover[rows, 1:], added_cond_kwargs=part, return_dict=False)
            down = [d.index_add(0, rows, d2) for d, d2 in zip(down, down_2, strict=True)]
            mid = mid.index_add(0, rows, mid_2)
        return down, mid

    return residuals


def save_controlnet(controlnet: Any, out_dir: Path) -> None:
    """A diffusers folder in fp16 (``controlnet`` itself stays as it is)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    copy.deepcopy(controlnet).to(torch.float16).save_pretrained(str(out_dir), safe_serialization=True)


def update_record(record_path: Path, settings: TrainingSettings) -> dict[str, Any]:
    """Put this phase's settings and the shipped files' SHA-256 (the ControlNet's with the others, beside the
    record) into a ``training.json`` that ``training.train_demo`` wrote."""
    from training.train_demo import weight_hashes

    record: dict[str, Any] = json.loads(record_path.read_text())
    record["settings"].update({k: v for k, v in dataclasses.asdict(settings).items() if k.startswith("controlnet_")})
    record["weights"] = weight_hashes(record_path.parent)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.train_controlnet")
    parser.add_argument("out", type=Path, help="the ControlNet's folder (e.g. imagen/data/demo/controlnet)")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="the saved demo model (diffusers)")
    parser.add_argument("--record", type=Path, default=None,
                        help="a training.json to add this phase's settings and the ControlNet's SHA-256 to")
    defaults = TrainingSettings()
    for field in dataclasses.fields(TrainingSettings):
        if field.name.startswith("controlnet_"):
            default = getattr(defaults, field.name)
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    settings = dataclasses.replace(
        defaults, **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingSettings)
                     if f.name.startswith("controlnet_")}
    )
    train_controlnet(args.model, args.out, settings)
    if args.record is not None:
        update_record(args.record, settings)
    return 0


assert 2 ** (len(EMBEDDING_CHANNELS) - 1) == LATENT_DOWNSCALE

if __name__ == "__main__":
    sys.exit(main())
