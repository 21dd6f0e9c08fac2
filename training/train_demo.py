"""``python -m training.train_demo OUT`` (what ``make demo-model`` runs): train the demo model on shapes, on a CPU.

Deterministic from its settings (seed, steps, threads): the same command on the same kind of machine writes
the same files. It runs in phases, each with its own seed:

1. **Data:** ``scenes`` training scenes (:func:`training.shapes.scenes`, never a held-out combination),
   drawn with jitter at 256 px and averaged to 32 x 32 cells: exactly what the hand-set VAE's encoder gives
   for the same picture at 1024 px (:mod:`training.demo_architecture`), with no VAE pass.
2. **Base model:** both text encoders and the UNet, from scratch, on SDXL's betas rescaled to a zero terminal
   SNR, with v-prediction (``zero_terminal_snr``, :func:`training.demo_architecture.demo_scheduler`: at
   the noisiest step the input holds nothing of the picture, so the UNet must take the layout from the
   caption), with offset and coarse noise (:func:`training_noise`), min-SNR weighting plus ``layout_weight``
   on the picture's error at every noise level (:func:`denoising_loss`), 10 % dropped captions for
   classifier-free guidance (as zero embeddings, which is what the pipeline gives an empty negative prompt),
   captions that sometimes leave out the size or the position, a loss that asks the encoders' outputs for
   every word of the caption (``word_loss``, :class:`WordHeads`: without it the shape and position words
   collapsed), and an exponential moving average of the weights, which is what is saved.
3. **LoRA:** a rank-4 LoRA on the UNet's attention, trained on pictures whose shape is blue whatever the caption
   says, saved in kohya's layout with its trigger word (``LORA_TRIGGER``).
4. **IP-Adapter:** a plain IP-Adapter and its own tiny CLIP image encoder, trained on the saved base model
   with the picture itself as reference, half the captions dropped and a quarter of the others swapped for
   another picture's (:func:`train_ip_adapter`).
5. **ControlNet:** a silhouette ControlNet (white shape on black), made from the saved base model's UNet and
   trained on it (frozen), into ``OUT/controlnet`` (:mod:`training.train_controlnet`, which also trains it
   alone: ``python -m training.train_controlnet``).
6. **Contact sheet** of held-out prompts, and ``training.json``: the settings and each file's SHA-256.

The weights are saved in fp16 as a diffusers folder (``OUT/model``), with the tokenizers, so that
``StableDiffusionXLPipeline.from_pretrained(OUT / "model")`` loads it anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import multiprocessing
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from imagen.registry.builtin import (
    DEMO_CONTROLNET_DIR,
    DEMO_IP_ADAPTER_PATH,
    DEMO_IP_ENCODER_DIR,
    DEMO_IP_REFERENCE,
    DEMO_LORA_PATH,
    DEMO_LORA_TRIGGER,
    TRAINING_RECORD,
)
from imagen.registry.demo_model import LATENT_DOWNSCALE, LATENT_SCALE, LUMA
from imagen.testing import ldm_export
from training import shapes
from training.demo_architecture import IMAGE_SIZE, build_untrained_pipeline

RENDER_SIZE = 256
"""Training pictures are drawn at this size and averaged to latent cells (8 x 8 pixels each)."""
LORA_TRIGGER = DEMO_LORA_TRIGGER
LORA_COLOUR = "blue"
LORA_FILE = DEMO_LORA_PATH.name
IP_ADAPTER_FILE = DEMO_IP_ADAPTER_PATH.name
IP_ENCODER_FOLDER = DEMO_IP_ENCODER_DIR.name
IP_REFERENCE_FILE = DEMO_IP_REFERENCE.name
IP_REFERENCE_SCENE = shapes.Scene("square", "yellow", "navy", "in the center", "large")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class TrainingSettings:
    seed: int = 0
    held_out_seed: int = 0
    held_out: int = 60
    scenes: int = 24000
    steps: int = 3600
    batch: int = 48
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    drop_size: float = 0.25
    drop_position: float = 0.25
    offset_noise: float = 0.5
    coarse_noise: float = 0.3
    zero_terminal_snr: bool = True
    snr_gamma: float = 5.0
    layout_weight: float = 1.0
    word_loss: float = 0.1
    outline_weight: float = 5.0
    ema_decay: float = 0.998
    lora_steps: int = 300
    lora_rank: int = 4
    lora_learning_rate: float = 2e-3
    filler: float = 0.15
    ip_steps: int = 1200
    ip_learning_rate: float = 2e-3
    ip_text_dropout: float = 0.5
    ip_image_dropout: float = 0.1
    ip_batch: int = 16
    ip_conflict: float = 0.25
    checkpoint_every: int = 500
    contact_prompts: int = 12
    threads: int = 2
    controlnet_steps: int = 1600
    controlnet_batch: int = 16
    controlnet_learning_rate: float = 1e-3
    controlnet_warmup_steps: int = 50
    controlnet_scenes: int = 10000
    controlnet_held_out_per_shape: int = 2
    controlnet_free_placement: float = 0.5
    controlnet_zoom: float = 0.3
    controlnet_shape_word: float = 0.4
    controlnet_contradict: float = 0.15
    controlnet_drop_position: float = 0.5
    controlnet_drop_size: float = 0.5
    controlnet_two_shapes: float = 0.15
    controlnet_threads: int = 1


ProgressFn = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


class Progress:
    """``phase: step k/n, loss, elapsed, ETA`` lines, at most every ``every_s`` seconds."""

    def __init__(self, phase: str, total: int, report: ProgressFn, every_s: float = 15.0) -> None:
        self.phase, self.total, self.report, self.every_s = phase, total, report, every_s
        self.start = time.monotonic()
        self.last = 0.0

    def step(self, done: int, detail: str = "") -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        self.report(
            f"{self.phase}: {done}/{self.total} {detail} elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min"
        )


# ---------------------------------------------------------------- data


def cell_means(image: Image.Image) -> np.ndarray[Any, np.dtype[np.float32]]:
    """(3, h, w) mean colour in [-1, 1] of each latent cell of ``image`` (drawn at any multiple of the grid)."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    cells = IMAGE_SIZE // LATENT_DOWNSCALE
    side = pixels.shape[0] // cells
    pooled = pixels.reshape(cells, side, cells, side, 3).mean(axis=(1, 3))
    return np.ascontiguousarray(pooled.transpose(2, 0, 1))


def to_latents(means: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) cell colours to scaled latents (n, 4, h, w): RGB and luminance, times the VAE's scale."""
    luma = LUMA[0] * means[:, 0] + LUMA[1] * means[:, 1] + LUMA[2] * means[:, 2]
    return torch.cat([means, luma.unsqueeze(1)], dim=1) * LATENT_SCALE


def _render_cells(job: tuple[shapes.Scene, int, str | None]) -> np.ndarray[Any, np.dtype[np.float32]]:
    scene, seed, recolour = job
    if recolour is not None:
        scene = dataclasses.replace(scene, colour=recolour)
    return cell_means(shapes.render(scene, RENDER_SIZE, np.random.default_rng(seed)))


def render_latents(
    scenes: Sequence[shapes.Scene], seed: int, threads: int, recolour: str | None = None
) -> torch.Tensor:
    jobs = [(scene, seed * 1_000_003 + i, recolour) for i, scene in enumerate(scenes)]
    if threads <= 1:  # a process of one would cost its start (torch's import: seconds) and gain nothing
        cells = [_render_cells(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(threads) as pool:
            cells = pool.map(_render_cells, jobs, chunksize=256)
    return to_latents(torch.from_numpy(np.stack(cells)))


FILLERS = ("a simple picture:", "flat illustration,", "clean vector art,", "minimal drawing,", "high quality,")
"""Words that say nothing about the picture: some captions start with a few, so that the describing words are
met at many token positions (a long prompt's colour word may come late, or in Compel's second chunk)."""


def caption_variant(scene: shapes.Scene, rng: random.Random, settings: TrainingSettings) -> str:
    """The full caption, or one without its size and/or position word (the picture still has them),
    sometimes after filler words."""
    size = "" if rng.random() < settings.drop_size else f"{scene.size} "
    position = "" if rng.random() < settings.drop_position else f" {scene.position}"
    text = f"a {size}{scene.colour} {scene.shape}{position} on a {scene.background} background"
    if rng.random() < settings.filler:
        text = " ".join(rng.choice(FILLERS) for _ in range(rng.randint(1, 8))) + " " + text
    return text


# ---------------------------------------------------------------- model pieces


class TextEncoding:
    """SDXL's prompt encoding with gradients: penultimate hidden states of both encoders, pooled from the second."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _ids(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        if caption not in self.cache:
            ids = [
                tok(caption, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids[0]
                for tok in (self.pipe.tokenizer, self.pipe.tokenizer_2)
            ]
            self.cache[caption] = (ids[0], ids[1])
        return self.cache[caption]

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden states (batch, 77, width), pooled (batch, pooled width))`` of every caption."""
        ids = [self._ids(c) for c in captions]
        ids_1 = torch.stack([i[0] for i in ids])
        ids_2 = torch.stack([i[1] for i in ids])
        out_1 = self.pipe.text_encoder(ids_1, output_hidden_states=True)
        out_2 = self.pipe.text_encoder_2(ids_2, output_hidden_states=True)
        embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return embeds, out_2.text_embeds


def drop_captions(
    embeds: torch.Tensor, pooled: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros where ``keep`` is false: what the pipeline gives an empty prompt (classifier-free guidance)."""
    mask = keep.float()
    return embeds * mask[:, None, None], pooled * mask[:, None]


WORD_KINDS: dict[str, tuple[str, ...]] = {
    "shape": shapes.SHAPES,
    "colour": tuple(shapes.COLOURS),
    "background": tuple(shapes.BACKGROUNDS),
    "position": (*shapes.POSITIONS, "not said"),
    "size": (*shapes.SIZES, "not said"),
}
"""What a caption says, kind by kind, as :class:`WordHeads` reads it back ("not said": the caption leaves it out)."""


def said(scene: shapes.Scene, caption: str) -> list[int]:
    """The index in :data:`WORD_KINDS` of each thing ``caption`` (a :func:`caption_variant` of ``scene``) says."""
    position_said = f"{scene.shape} {scene.position} on a " in caption
    size_said = f"a {scene.size} {scene.colour} {scene.shape}" in caption
    values = {
        "shape": scene.shape,
        "colour": scene.colour,
        "background": scene.background,
        "position": scene.position if position_said else "not said",
        "size": scene.size if size_said else "not said",
    }
    return [WORD_KINDS[kind].index(values[kind]) for kind in WORD_KINDS]


class WordHeads(torch.nn.Module):
    """Linear read-outs of every word kind (:data:`WORD_KINDS`) from what the UNet is given of a caption: the
    pooled embedding, and the hidden states averaged over the 77 tokens. Their cross-entropy, added to the
    denoising loss during base training (``word_loss``), makes the text encoders keep the shape and the
    position words apart: trained on the denoising loss alone, the encoders kept colour, size and background
    words apart (what most of the picture's pixels depend on) but mapped every shape and every position word
    to nearly the same hidden states, and the UNet drew the dataset's average shape in the middle
    (``training/diagnose.py``). The heads are not saved; the model stays a plain SDXL pipeline."""

    def __init__(self, hidden_width: int, pooled_width: int, seed: int) -> None:
        super().__init__()
        classes = sum(len(values) for values in WORD_KINDS.values())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.from_hidden = torch.nn.Linear(hidden_width, classes)
            self.from_pooled = torch.nn.Linear(pooled_width, classes)

    def forward(self, embeds: torch.Tensor, pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over word kinds and both read-outs; ``targets`` (batch, kinds) from :func:`said`."""
        losses = []
        for logits in (self.from_hidden(embeds.mean(dim=1)), self.from_pooled(pooled)):
            for kind, chunk in enumerate(logits.split([len(v) for v in WORD_KINDS.values()], dim=1)):
                losses.append(torch.nn.functional.cross_entropy(chunk, targets[:, kind]))
        return torch.stack(losses).mean()


def time_ids(batch: int) -> torch.Tensor:
    return torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32).repeat(
        batch, 1
    )


class NoiseSchedule:
    """The noise levels the model's own scheduler samples with (its ``alphas_cumprod``) and what it expects the
    UNet to predict (its ``prediction_type``), taken from it, so that training and sampling cannot disagree.

    The demo model's scheduler has a zero terminal SNR (:func:`demo_scheduler`): its noisiest step keeps
    nothing of the picture, so there the UNet must draw the layout from the caption alone, and it predicts
    ``v`` (at that step, minus the picture), since a noise prediction says nothing there."""

    def __init__(self, scheduler: Any) -> None:
        self.alphas_cumprod: torch.Tensor = scheduler.alphas_cumprod.detach().to(torch.float32).clone()
        self.steps = scheduler.config.num_train_timesteps
        self.prediction_type: str = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r}: the training knows epsilon and v_prediction")

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t].view(-1, 1, 1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._alpha(t)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should output for ``add_noise(x0, noise, t)``: the noise, or v."""
        if self.prediction_type == "epsilon":
            return noise
        a = self._alpha(t)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def picture_estimate(self, noisy: torch.Tensor, predicted: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean picture that the UNet's output ``predicted`` for ``noisy`` at ``t`` implies."""
        a = self._alpha(t)
        if self.prediction_type == "epsilon":
            return (noisy - (1 - a).sqrt() * predicted) / a.sqrt()
        return a.sqrt() * noisy - (1 - a).sqrt() * predicted

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t]
        return a / (1 - a)

    def loss_weight(self, t: torch.Tensor, gamma: float, layout_weight: float) -> torch.Tensor:
        """Weight of each sample's squared error of the prediction, chosen as a weight on the picture's error.

        An error of the noise is an error of the picture times sqrt(SNR), an error of v one times
        sqrt(SNR + 1). Min-SNR weights the picture's squared error by min(SNR, gamma): about 0.005 at SDXL's
        noisiest step against 5 at the cleanest (and 0 at a zero-terminal-SNR one), and the noisiest steps
        are where the sampler settles where the shape goes and what it is. ``layout_weight`` adds that much
        weight on the picture's error at every step. With v-prediction and ``layout_weight`` 1 that is plain
        v-prediction loss, capped at gamma + 1 on the picture for the cleanest steps."""
        picture_weight = torch.clamp(self.snr(t), max=gamma) + layout_weight
        if self.prediction_type == "epsilon":
            return picture_weight / self.snr(t)
        return picture_weight / (self.snr(t) + 1)


def _learning_rate(step: int, settings: TrainingSettings, total: int, peak: float) -> float:
    if step < settings.warmup_steps:
        return peak * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


COARSE_CELLS = 4


def training_noise(shape: torch.Size, settings: TrainingSettings, generator: torch.Generator) -> torch.Tensor:
    """White noise, plus an offset per picture and channel, plus smooth noise on a 4 x 4 grid.

    SDXL's schedule keeps a little of the picture even at its noisiest step (``sqrt(alpha_bar)`` ~ 0.07), and
    at 32 x 32 latents the mean of white noise is nearly exact: without the two extra terms the UNet learns
    to read the background colour (the picture's mean) and the shape's place (its coarse layout) from the
    noisy input instead of from the caption, and draws the dataset's average background from pure noise.
    A zero-terminal-SNR schedule removes that at the noisiest step; the two terms still make the steps just
    after it (``sqrt(alpha_bar)`` 0.05 at t = 900) lean on the caption."""
    batch, channels, height, width = shape
    noise = torch.randn(shape, generator=generator)
    noise = noise + settings.offset_noise * torch.randn((batch, channels, 1, 1), generator=generator)
    coarse = torch.randn((batch, channels, COARSE_CELLS, COARSE_CELLS), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return noise + settings.coarse_noise * smooth


def outline_weights(latents: torch.Tensor, weight: float) -> torch.Tensor:
    """(batch, 1, h, w) weights of each latent cell's error: 1 where the picture is flat, up to ``1 + weight`` on
    its outlines (how far a cell is from the mean of its 3 x 3 neighbourhood, over the channels, relative to the
    picture's largest such difference).

    A shape word decides a few cells along the outline: at 32 x 32 latents the mean training pictures of
    circle, square, triangle and star differ by a tenth of the picture's norm, and with an even loss the UNet
    drew one rounded blob for all four (``training/diagnose.py``, its fourth table)."""
    local = torch.nn.functional.avg_pool2d(latents, 3, stride=1, padding=1, count_include_pad=False)
    edges = (latents - local).abs().sum(dim=1, keepdim=True)
    edges = edges / edges.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return 1.0 + weight * edges


ControlResiduals = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]], tuple[Sequence[torch.Tensor], torch.Tensor]
]
"""ControlNet residuals (down blocks', middle block's) for the UNet's ``(noisy, t, embeds, added_cond_kwargs)``."""


def denoising_loss(
    pipe: Any,
    text: TextEncoding,
    schedule: NoiseSchedule,
    latents: torch.Tensor,
    captions: Sequence[str],
    keep: torch.Tensor,
    settings: TrainingSettings,
    generator: torch.Generator,
    image_embeds: torch.Tensor | None = None,
    words: tuple[WordHeads, torch.Tensor] | None = None,
    controlnet: ControlResiduals | None = None,
) -> torch.Tensor:
    """The weighted denoising loss of one batch; with ``words`` (heads, targets from :func:`said`), plus
    ``word_loss`` times the heads' loss on the captions' encodings (dropped captions included: the heads read
    the encoders, not what the UNet is given); with ``controlnet``, the residuals it gives for the UNet's input
    (``noisy, t, embeds, added_cond_kwargs``: the ControlNets' summed outputs) added to the UNet's blocks, as
    the ControlNet pipelines do."""
    batch = latents.shape[0]
    noise = training_noise(latents.shape, settings, generator)
    t = torch.randint(0, schedule.steps, (batch,), generator=generator)
    noisy = schedule.add_noise(latents, noise, t)
    full_embeds, full_pooled = text.encode(captions)
    embeds, pooled = drop_captions(full_embeds, full_pooled, keep)
    added: dict[str, Any] = {"text_embeds": pooled, "time_ids": time_ids(batch)}
    if image_embeds is not None:  # one IP-Adapter, one image per prompt: (batch, 1, width)
        added["image_embeds"] = [image_embeds[:, None, :]]
    residuals: dict[str, Any] = {}
    if controlnet is not None:
        down, mid = controlnet(noisy, t, embeds, added)
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    predicted = pipe.unet(noisy, t, embeds, added_cond_kwargs=added, **residuals).sample
    squared = (predicted - schedule.target(latents, noise, t)) ** 2
    if settings.outline_weight:
        squared = squared * outline_weights(latents, settings.outline_weight)
    per_sample = squared.mean(dim=(1, 2, 3))
    weight = schedule.loss_weight(t, settings.snr_gamma, settings.layout_weight)
    loss: torch.Tensor = (per_sample * weight).mean()
    if words is not None:
        heads, targets = words
        loss = loss + settings.word_loss * heads(full_embeds, full_pooled, targets)
    return loss


# ---------------------------------------------------------------- phases


def sample_batch(
    scenes: Sequence[shapes.Scene], rng: random.Random, settings: TrainingSettings, prefix: str = ""
) -> tuple[list[int], list[str]]:
    """``batch`` scene indices drawn with ``rng``, and a caption variant of each (after ``prefix``)."""
    idx = [rng.randrange(len(scenes)) for _ in range(settings.batch)]
    return idx, [prefix + caption_variant(scenes[i], rng, settings) for i in idx]


def optimise(
    progress: Progress,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[], torch.Tensor],
    learning_rate: Callable[[int], float],
    clip: Sequence[torch.nn.Parameter] = (),
    after_step: Callable[[int], None] | None = None,
    smoothing: float = 0.95,
) -> None:
    """The loop every phase runs: for each of ``progress.total`` steps set the learning rate, take one
    optimizer step on ``batch_loss()`` (gradients clipped to norm 1 over ``clip``, if given), call
    ``after_step(step)``, and report the loss's running mean."""
    running = 0.0
    for step in range(progress.total):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if clip:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        running = smoothing * running + (1 - smoothing) * loss.item() if step else loss.item()
        progress.step(step + 1, f"loss {running:.4f}")


def train_base(
    pipe: Any, scenes: Sequence[shapes.Scene], latents: torch.Tensor, settings: TrainingSettings,
    report: ProgressFn, checkpoint: Path | None = None,
) -> None:
    """Train both text encoders and the UNet in place; leaves the EMA weights in the pipeline (and, every
    ``checkpoint_every`` steps, saves them to ``checkpoint``: it changes nothing in the run)."""
    modules = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    ema = [p.detach().clone() for p in params]
    heads = WordHeads(pipe.unet.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim, settings.seed)
    optimizer = torch.optim.AdamW([*params, *heads.parameters()], lr=settings.learning_rate, weight_decay=0.0)
    text = TextEncoding(pipe)
    schedule = NoiseSchedule(pipe.scheduler)
    rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)

    def batch_loss() -> torch.Tensor:
        idx, captions = sample_batch(scenes, rng, settings)
        keep = torch.tensor([rng.random() >= settings.caption_dropout for _ in idx])
        targets = torch.tensor([said(scenes[i], c) for i, c in zip(idx, captions, strict=True)])
        return denoising_loss(pipe, text, schedule, latents[idx], captions, keep, settings, generator,
                              words=(heads, targets))

    def after_step(step: int) -> None:
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, p in zip(ema, params, strict=True):
                shadow.lerp_(p.detach(), 1 - decay)
        if checkpoint is not None and (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                for shadow, p in zip(ema, params, strict=True):
                    p.copy_(shadow)
            pipe.save_pretrained(str(checkpoint), safe_serialization=True)
            with torch.no_grad():
                for saved, p in zip(live, params, strict=True):
                    p.copy_(saved)
            report(f"base model: checkpoint of the averaged weights at step {step + 1} in {checkpoint}")

    optimise(
        Progress("base model", settings.steps, report), optimizer, batch_loss,
        lambda step: _learning_rate(step, settings, settings.steps, settings.learning_rate),
        clip=params, after_step=after_step, smoothing=0.98,
    )
    with torch.no_grad():
        for shadow, p in zip(ema, params, strict=True):
            p.copy_(shadow)
    for m in modules:
        m.eval()


def train_lora(
    pipe: Any, scenes: Sequence[shapes.Scene], latents: torch.Tensor, settings: TrainingSettings,
    report: ProgressFn,
) -> dict[str, torch.Tensor]:
    """A rank-``lora_rank`` LoRA on the UNet's attention that makes every shape blue; kohya layout."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(settings.seed + 7)
    pipe.unet.add_adapter(
        LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, target_modules=list(LORA_TARGETS),
                   init_lora_weights="gaussian")
    )
    for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lora_learning_rate, weight_decay=0.0)
    text = TextEncoding(pipe)
    schedule = NoiseSchedule(pipe.scheduler)
    rng = random.Random(settings.seed + 7)
    generator = torch.Generator().manual_seed(settings.seed + 7)
    lora_settings = dataclasses.replace(settings, warmup_steps=20)

    def batch_loss() -> torch.Tensor:
        idx, captions = sample_batch(scenes, rng, settings, prefix=f"{LORA_TRIGGER}, ")
        keep = torch.tensor([rng.random() >= settings.caption_dropout for _ in idx])
        return denoising_loss(pipe, text, schedule, latents[idx], captions, keep, settings, generator)

    pipe.unet.train()
    optimise(
        Progress("LoRA", settings.lora_steps, report), optimizer, batch_loss,
        lambda step: _learning_rate(step, lora_settings, settings.lora_steps, settings.lora_learning_rate),
    )
    pipe.unet.eval()
    state = get_peft_model_state_dict(pipe.unet)
    config = dict(pipe.unet.config)
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".lora_")
        ldm = "lora_unet_" + ldm_export.unet_module_to_ldm(module, config).replace(".", "_")
        name = "lora_down" if kind.startswith("A") else "lora_up"
        kohya[f"{ldm}.{name}.weight"] = tensor.detach().to(torch.float16).contiguous()
        kohya[f"{ldm}.alpha"] = torch.tensor(float(settings.lora_rank), dtype=torch.float16)
    pipe.unet.delete_adapters("default")
    return kohya


IP_IMAGE_SIZE = 32
IP_EMBED_WIDTH = 32
IP_TOKENS = 4


def ip_encoder_config() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=IP_EMBED_WIDTH, intermediate_size=IP_EMBED_WIDTH * 4, projection_dim=IP_EMBED_WIDTH,
        num_hidden_layers=2, num_attention_heads=2, image_size=IP_IMAGE_SIZE, patch_size=4,
    )


def _cross_attention_widths(unet: Any) -> list[tuple[str, int]]:
    """(processor name, hidden width) of every cross-attention layer, in the order IP-Adapter files number
    them (``ip_adapter.1``, ``.3``, ...: the original numbering counts self-attention layers too)."""
    channels = list(unet.config.block_out_channels)
    widths = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            widths.append((name, channels[-1]))
        elif name.startswith("up_blocks"):
            widths.append((name, list(reversed(channels))[int(name.split(".")[1])]))
        else:
            widths.append((name, channels[int(name.split(".")[1])]))
    return widths


def load_trained_pipeline(model_dir: Path) -> Any:
    """A model folder this command wrote (``OUT/model`` or a checkpoint), in float32, with the real tokenizers."""
    from diffusers import StableDiffusionXLPipeline

    from imagen.generation.diffusers.components import load_clip_tokenizers

    tokenizer, tokenizer_2 = load_clip_tokenizers()
    pipe = StableDiffusionXLPipeline.from_pretrained(  # type: ignore[no-untyped-call]
        str(model_dir), dtype=torch.float32, tokenizer=tokenizer, tokenizer_2=tokenizer_2
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_ip_adapter(
    model_dir: Path, scenes: Sequence[shapes.Scene], latents: torch.Tensor, settings: TrainingSettings,
    report: ProgressFn,
) -> tuple[dict[str, torch.Tensor], Any]:
    """A plain IP-Adapter (4 image tokens) and its own tiny CLIP vision encoder, trained on the saved base
    model (frozen): the reference is the very picture being denoised, and half the captions are dropped, so
    the image tokens must carry what the picture shows. ``ip_conflict`` of the remaining captions are another
    picture's: where the prompt and the reference disagree, the reference is what is drawn, so that a
    reference pulls the picture towards itself against a prompt that asks for other colours (trained without
    them, 400 steps of 48, it moved the colours a tenth of the way at ``ip_strength`` 1; with them, 1,200
    steps of 16 in the same time, a third of the way, and without a prompt four fifths). Only the phase's
    own seeded generators are drawn from, so it gives the same files whether the phases before it ran in the
    same process or not. Returns the adapter's tensors in the original (``image_proj.*``,
    ``ip_adapter.N.to_k_ip.weight``) layout and the encoder."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    pipe = load_trained_pipeline(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 13)
        encoder = CLIPVisionModelWithProjection(ip_encoder_config())
        generator = torch.Generator().manual_seed(settings.seed + 13)
        cross = int(pipe.unet.config.cross_attention_dim)
        initial: dict[str, torch.Tensor] = {
            "proj.weight": torch.randn(cross * IP_TOKENS, IP_EMBED_WIDTH, generator=generator) * 0.02,
            "proj.bias": torch.zeros(cross * IP_TOKENS),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        }
        adapter: dict[str, torch.Tensor] = {}
        for number, (_, hidden) in enumerate(_cross_attention_widths(pipe.unet)):
            for kind in ("to_k_ip", "to_v_ip"):
                adapter[f"{2 * number + 1}.{kind}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.02
    pipe.register_modules(image_encoder=encoder)
    pipe.load_ip_adapter({"image_proj": initial, "ip_adapter": adapter}, subfolder="",
                         weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)
    processor = CLIPImageProcessor(size=IP_IMAGE_SIZE, crop_size=IP_IMAGE_SIZE)
    report(f"IP-Adapter data: {len(scenes)} reference pictures")
    references = torch.cat([
        processor([_picture(latents[i]) for i in range(start, min(start + 512, len(scenes)))],
                  return_tensors="pt").pixel_values
        for start in range(0, len(scenes), 512)
    ])
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.text_encoder_2.requires_grad_(False)
    processors = [pipe.unet.attn_processors[name] for name, _ in _cross_attention_widths(pipe.unet)]
    trainable = [*encoder.parameters(), *pipe.unet.encoder_hid_proj.parameters()]
    trainable += [p for proc in processors for p in proc.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=settings.ip_learning_rate, weight_decay=0.0)
    text = TextEncoding(pipe)
    schedule = NoiseSchedule(pipe.scheduler)
    rng = random.Random(settings.seed + 13)
    noise_generator = torch.Generator().manual_seed(settings.seed + 13)
    ip_settings = dataclasses.replace(settings, warmup_steps=20, batch=settings.ip_batch)

    def batch_loss() -> torch.Tensor:
        idx, captions = sample_batch(scenes, rng, ip_settings)
        if settings.ip_conflict:  # the caption of another picture: where they disagree, the reference wins
            captions = [
                caption_variant(scenes[rng.randrange(len(scenes))], rng, settings)
                if rng.random() < settings.ip_conflict else caption
                for caption in captions
            ]
        keep_text = torch.tensor([rng.random() >= settings.ip_text_dropout for _ in idx])
        keep_image = torch.tensor([rng.random() >= settings.ip_image_dropout for _ in idx]).float()
        image_embeds = encoder(references[idx]).image_embeds * keep_image[:, None]
        return denoising_loss(pipe, text, schedule, latents[idx], captions, keep_text, settings,
                              noise_generator, image_embeds=image_embeds)

    encoder.train()
    optimise(
        Progress("IP-Adapter", settings.ip_steps, report), optimizer, batch_loss,
        lambda step: _learning_rate(step, ip_settings, settings.ip_steps, settings.ip_learning_rate),
    )
    encoder.eval()  # type: ignore[no-untyped-call]
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    tensors = {
        "image_proj.proj.weight": projection.image_embeds.weight,
        "image_proj.proj.bias": projection.image_embeds.bias,
        "image_proj.norm.weight": projection.norm.weight,
        "image_proj.norm.bias": projection.norm.bias,
    }
    for number, proc in enumerate(processors):
        tensors[f"ip_adapter.{2 * number + 1}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        tensors[f"ip_adapter.{2 * number + 1}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    halves = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
    encoder.half()  # type: ignore[no-untyped-call]
    return halves, encoder


def _picture(latent: torch.Tensor) -> Image.Image:
    """The 32 x 32 picture of a latent (its cell colours), which is what the 32 px image encoder sees of a
    reference drawn at any size."""
    rgb = ((latent[:3] / LATENT_SCALE).clamp(-1, 1) + 1) * 127.5
    return Image.fromarray(rgb.round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")


def contact_sheet(pipe: Any, prompts: Sequence[str], seed: int, columns: int = 4, thumb: int = 192) -> Image.Image:
    """A grid of ``prompts`` drawn at 1024 px, 30 steps, guidance 7.5, each with its caption under it."""
    rows = math.ceil(len(prompts) / columns)
    label = 40
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        image = pipe(prompt, num_inference_steps=30, guidance_scale=7.5, height=IMAGE_SIZE, width=IMAGE_SIZE,
                     generator=generator).images[0]
        x, y = (i % columns) * thumb, (i // columns) * (thumb + label)
        sheet.paste(image.resize((thumb, thumb), Image.Resampling.LANCZOS), (x, y))
        words = prompt.split(" ")
        half = len(words) // 2
        for line, text in enumerate((" ".join(words[:half]), " ".join(words[half:]))):
            draw.text((x + 4, y + thumb + 4 + 16 * line), text, fill=(0, 0, 0))
    return sheet


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SHIPPED = ("model", "loras", "ip-adapter", DEMO_CONTROLNET_DIR.name)
"""What goes into the package (``imagen/data/demo``), beside ``training.json``."""


def weight_hashes(out: Path, folders: Sequence[str] = SHIPPED) -> dict[str, str]:
    """SHA-256 of every weights file in ``folders`` (those that ship), by path relative to ``out``."""
    files = [p for folder in folders for p in sorted((out / folder).rglob("*.safetensors"))]
    return {p.relative_to(out).as_posix(): sha256(p) for p in files}


def train_demo(out: Path, settings: TrainingSettings, report: ProgressFn = _print) -> dict[str, Any]:
    """Run every phase; write ``out/model`` (diffusers, fp16), ``out/loras/<colour>.safetensors``,
    ``out/ip-adapter``, ``out/controlnet``, ``out/contact-sheet.png`` and ``out/training.json``. Returns the
    record written. Torch's thread count and determinism flag are set for the run and put back after it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(out, settings, report)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(out: Path, settings: TrainingSettings, report: ProgressFn) -> dict[str, Any]:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    report(f"training the demo model into {out}: {json.dumps(dataclasses.asdict(settings))}")

    scenes = shapes.scenes(settings.seed, settings.scenes, settings.held_out_seed, settings.held_out)
    report(f"data: drawing {len(scenes)} training scenes")
    latents = render_latents(scenes, settings.seed, settings.threads)
    pipe = build_untrained_pipeline(settings.seed, settings.zero_terminal_snr)
    train_base(pipe, scenes, latents, settings, report, checkpoint=out / "checkpoint")
    model_dir = out / "model"
    save_fp16(pipe, model_dir)

    drawable = [s for s in scenes if shapes.drawable(LORA_COLOUR, s.background)]
    report(f"LoRA data: redrawing {len(drawable[: settings.scenes // 4])} scenes with {LORA_COLOUR} shapes")
    lora_scenes = drawable[: settings.scenes // 4]
    lora_latents = render_latents(lora_scenes, settings.seed + 7, settings.threads, recolour=LORA_COLOUR)
    lora = train_lora(pipe, lora_scenes, lora_latents, settings, report)  # leaves PEFT wrappers: saved before

    ip_tensors, ip_encoder = train_ip_adapter(model_dir, scenes, latents, settings, report)
    ip_dir = out / "ip-adapter"
    if ip_dir.exists():
        shutil.rmtree(ip_dir)
    ip_encoder.save_pretrained(str(ip_dir / IP_ENCODER_FOLDER), safe_serialization=True)
    save_file(ip_tensors, str(ip_dir / IP_ADAPTER_FILE), metadata={"format": "pt"})
    reference = shapes.render(IP_REFERENCE_SCENE, 256)
    reference.save(ip_dir / IP_REFERENCE_FILE)

    from training.train_controlnet import CONTROLNET_FOLDER, train_controlnet  # it imports this module

    train_controlnet(model_dir, out / CONTROLNET_FOLDER, settings, report)

    lora_dir = out / "loras"
    lora_dir.mkdir(exist_ok=True)
    lora_path = lora_dir / LORA_FILE
    save_file(lora, str(lora_path), metadata={"ss_trigger_words": LORA_TRIGGER})

    held = shapes.held_out_combinations(settings.held_out_seed, settings.held_out)
    count = settings.contact_prompts
    prompts = [shapes.caption(s) for s in held[:: max(1, len(held) // max(1, count))][:count]]
    report("contact sheet: drawing held-out prompts")
    pipe.set_progress_bar_config(disable=True)
    contact_sheet(pipe, prompts, settings.seed).save(out / "contact-sheet.png")

    record = write_record(out, settings, minutes=(time.monotonic() - started) / 60)
    report(f"done in {record['minutes']} min: {model_dir}, {lora_path}, {out / 'contact-sheet.png'}")
    return record


def save_fp16(pipe: Any, model_dir: Path) -> None:
    """Save the pipeline as a diffusers folder in fp16, leaving ``pipe`` itself in fp32 as it was."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    halves = {
        name: copy.deepcopy(part).to(torch.float16) if isinstance(part, torch.nn.Module) else part
        for name, part in pipe.components.items()
    }
    saved = type(pipe)(
        **halves, force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt, add_watermarker=False
    )
    saved.save_pretrained(str(model_dir), safe_serialization=True)


def write_record(out: Path, settings: TrainingSettings, minutes: float) -> dict[str, Any]:
    """``out/training.json``: the settings, versions, time taken and the SHA-256 of every weights file."""
    record = {
        "settings": dataclasses.asdict(settings),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "minutes": round(minutes, 1),
        "weights": weight_hashes(out),
        "lora": {"file": f"loras/{LORA_FILE}", "trigger_word": LORA_TRIGGER},
    }
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.train_demo")
    parser.add_argument("out", type=Path)
    defaults = TrainingSettings()
    for field in dataclasses.fields(TrainingSettings):
        default = getattr(defaults, field.name)
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args(argv)
    settings = TrainingSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingSettings)})
    train_demo(args.out, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
