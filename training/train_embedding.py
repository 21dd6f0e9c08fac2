"""``python -m training.train_embedding OUT [--model imagen/data/demo/model] [--record training.json]``: a
textual inversion (an "embedding") for the demo model, trained on a CPU (one thread) on top of the saved model,
which stays frozen.

What it is: a new word, :data:`WORD` ("chartreuse"), for a colour that no word of the shapes language says:
:data:`COLOUR`, halfway between the palette's yellow and green (:data:`BETWEEN`), 118 or more (RGB) from every
palette colour. ``"a large chartreuse circle on the left on a white background"`` draws that circle in it, on the
backgrounds where both yellow and green are drawn (white, beige, sky blue: :func:`drawable_on`).

Training: the word is added to both tokenizers as one new token, and its row of each text encoder's token table
(``text_encoder``, CLIP-L-like, and ``text_encoder_2``, CLIP-G-like) starts at the mean of the rows of "yellow"
and "green"; those two rows (``vectors`` of them each, one by default) are all that is trained
(:class:`NewRows`), on the base model's own denoising loss (:func:`training.train_demo.denoising_loss`: its
noise, schedule and weighting, without the extra weight on outlines, ``outline_weight`` 0: the word says a
colour, which fills the shape; with it, the shapes' interiors came out up to 67 from the colour, without it at
most 54). The pictures are scenes of the shapes language whose shape is redrawn in :data:`COLOUR`: drawn as the
base model's are (256 px, averaged to latent cells), each cell recoloured by how much of it the shape covers
(:func:`recolour_cells`: exact, the drawing being antialiased by averaging). Captions are the base model's
(:func:`training.train_demo.caption_variant`: size and position sometimes left out, filler words now and then)
with the word in place of the colour. A few (shape, position, size) combinations are never shown
(:func:`held_out_places`): ``tests/test_demo_embedding.py`` draws those. Deterministic from the seed with one
thread: 400 steps of 16 pictures, about 4 minutes (5.6 on a busy machine).

The word is added as diffusers' own ``pipe.load_textual_inversion(tensor, token=WORD, text_encoder=...,
tokenizer=...)`` adds it, so that it has the same token id (49408, the first after the vocabulary) in training as
in use. **The pooled embedding:** the demo encoders' configs, like SDXL's ``text_encoder_2``'s, have the legacy
``eos_token_id`` 2, with which transformers reads the pooled embedding at the token of the highest id, which is
the added word's wherever it is in the prompt, not the end of text. The demo UNet takes the background from the
pooled embedding, and so an embedding trained and used that way drew the wrong background on 3 of 8 held-out
prompts and yellow shapes on 5 (its loss stayed near 0.37, against 0.05 pooling at the end of text).
:func:`pool_at_end_of_text` sets the encoders' ``eos_token_id`` to the real one (49407), which changes nothing
for a prompt without an added word; training does it, and a pipeline that uses the embedding must do it too.

Saved as SDXL embeddings ship for A1111 and civitai: one ``OUT/<WORD>.safetensors`` holding ``clip_l``
``(vectors, 8)`` and ``clip_g`` ``(vectors, 16)`` (the demo encoders' widths; 768 and 1280 in SDXL), float32. Load
it as diffusers documents for SDXL::

    state = safetensors.torch.load_file("chartreuse.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="chartreuse", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="chartreuse", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)

``--record training.json`` puts this phase's settings, the colour, the time taken and the file's SHA-256 into
that file under a key of its own (:data:`RECORD_KEY`), leaving the others as they are.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import load_file, save_file

from imagen.generation.diffusers.embeddings import pool_at_end_of_text
from imagen.registry.demo_model import DEMO_MODEL_DIR
from training import shapes
from training.train_controlnet import cell_coverage
from training.train_demo import (
    RENDER_SIZE,
    NoiseSchedule,
    Progress,
    ProgressFn,
    TextEncoding,
    TrainingSettings,
    _learning_rate,
    _print,
    caption_variant,
    cell_means,
    denoising_loss,
    load_trained_pipeline,
    optimise,
    sha256,
    to_latents,
)

WORD = "chartreuse"
"""The new word: not a token of the CLIP vocabulary (it splits into ``char tre use``), so it can be added."""
BETWEEN = ("yellow", "green")
"""The palette colours :data:`COLOUR` lies halfway between."""
COLOUR: shapes.RGB = (
    round((shapes.COLOURS[BETWEEN[0]][0] + shapes.COLOURS[BETWEEN[1]][0]) / 2),
    round((shapes.COLOURS[BETWEEN[0]][1] + shapes.COLOURS[BETWEEN[1]][1]) / 2),
    round((shapes.COLOURS[BETWEEN[0]][2] + shapes.COLOURS[BETWEEN[1]][2]) / 2),
)
"""(132, 198, 35): what the word means."""
EMBEDDING_FOLDER = "embeddings"
"""``imagen/data/demo/embeddings``, beside the model."""
EMBEDDING_FILE = f"{WORD}.safetensors"
"""A1111's way: the file's name is the word."""
RECORD_KEY = "embedding"
"""This phase's entry in ``training.json``."""
TENSOR_NAMES = ("clip_l", "clip_g")
"""The SDXL embedding file's tensors: for ``text_encoder`` (CLIP-L) and for ``text_encoder_2`` (CLIP-G)."""


@dataclasses.dataclass(frozen=True)
class EmbeddingSettings:
    seed: int = 0
    vectors: int = 1
    outline_weight: float = 0.0
    steps: int = 400
    batch: int = 16
    learning_rate: float = 1e-2
    warmup_steps: int = 20
    scenes: int = 3000
    held_out_per_shape: int = 2
    threads: int = 1


def drawable_on(background: str) -> bool:
    """Whether :data:`COLOUR` is drawn on ``background``: where it stands out enough (as
    :func:`training.shapes.drawable`) and both colours it lies between are drawn there too. The base model never
    drew a green shape on navy or dark green (too close); on those, trained there too, a one-vector embedding
    drew its shapes yellow (interior RGB about (195, 225, 30)), and greener on white to make up for it."""
    return (shapes.rgb_distance(COLOUR, shapes.BACKGROUNDS[background]) >= shapes.MIN_CONTRAST
            and all(shapes.drawable(name, background) for name in BETWEEN))


BACKGROUNDS: tuple[str, ...] = tuple(b for b in shapes.BACKGROUNDS if drawable_on(b))
"""The backgrounds :data:`COLOUR` is drawn on: white, beige and sky blue."""

Place = tuple[str, str, str]
"""(shape, position, size)."""


def held_out_places(seed: int, per_shape: int) -> list[Place]:
    """(shape, position, size) combinations never shown in training: ``per_shape`` of each shape's ten."""
    rng = np.random.default_rng(seed)
    places = [(position, size) for position in shapes.POSITIONS for size in shapes.SIZES]
    held = []
    for shape in shapes.SHAPES:
        for i in sorted(int(i) for i in rng.permutation(len(places))[:per_shape]):
            held.append((shape, *places[i]))
    return held


def held_out_scenes(settings: EmbeddingSettings) -> list[shapes.Scene]:
    """One scene for each held-out place, on each of :data:`BACKGROUNDS` in turn. The scene's own colour is
    yellow or green in turn (a :class:`training.shapes.Scene` knows no other; both are drawn on those
    backgrounds); :func:`prompt` puts the word in its place."""
    return [
        shapes.Scene(shape, BETWEEN[i % 2], BACKGROUNDS[i % len(BACKGROUNDS)], position, size)
        for i, (shape, position, size) in enumerate(held_out_places(settings.seed + 23, settings.held_out_per_shape))
    ]


def prompt(scene: shapes.Scene, colour: str | None = WORD) -> str:
    """``scene``'s caption with ``colour`` (the word by default; None: no colour word) instead of its own."""
    said = "" if colour is None else f"{colour} "
    return shapes.caption(scene).replace(f"{scene.colour} {scene.shape}", f"{said}{scene.shape}", 1)


def recolour_cells(cells: npt.NDArray[Any], scene: shapes.Scene, colour: shapes.RGB) -> npt.NDArray[np.float32]:
    """Latent cells (3, h, w) of a picture of ``scene`` (:func:`training.train_demo.cell_means`), the shape in
    ``colour`` instead: each cell moves from the background by the share of it the shape covers."""
    cover = cell_coverage(cells, scene)[None]
    background = (np.asarray(shapes.BACKGROUNDS[scene.background], dtype=np.float32) / 127.5 - 1)[:, None, None]
    target = (np.asarray(colour, dtype=np.float32) / 127.5 - 1)[:, None, None]
    recoloured: npt.NDArray[np.float32] = (background + cover * (target - background)).astype(np.float32)
    return recoloured


def embedding_data(
    settings: EmbeddingSettings, base: TrainingSettings, report: ProgressFn
) -> tuple[list[shapes.Scene], torch.Tensor]:
    """The training scenes (the base model's, on the backgrounds :data:`COLOUR` stands out on, no held-out
    place) and their latents, the shape in :data:`COLOUR`."""
    seed = settings.seed + 23
    held = set(held_out_places(seed, settings.held_out_per_shape))
    pool = shapes.scenes(seed, settings.scenes * 3, base.held_out_seed, base.held_out)
    scenes = [s for s in pool if s.background in BACKGROUNDS and (s.shape, s.position, s.size) not in held]
    scenes = scenes[: settings.scenes]
    report(f"embedding data: drawing {len(scenes)} scenes in {WORD} {COLOUR}, {len(held)} places held out")
    cells = [
        recolour_cells(cell_means(shapes.render(scene, RENDER_SIZE, np.random.default_rng(seed * 1_000_003 + i))),
                       scene, COLOUR)
        for i, scene in enumerate(scenes)
    ]
    return scenes, to_latents(torch.from_numpy(np.stack(cells)))


def spelled(vectors: int) -> str:
    """The word as the text encoders get it: diffusers' pipelines write a word of ``vectors`` vectors as that
    many tokens, ``WORD WORD_1 WORD_2 ...`` (``maybe_convert_prompt``)."""
    return " ".join([WORD] + [f"{WORD}_{i}" for i in range(1, vectors)])


def word_caption(scene: shapes.Scene, rng: random.Random, base: TrainingSettings, vectors: int = 1) -> str:
    """A caption of ``scene`` as the base model was trained on (:func:`training.train_demo.caption_variant`),
    the word (as :func:`spelled`) in place of the colour."""
    caption = caption_variant(scene, rng, base)
    return caption.replace(f"{scene.colour} {scene.shape}", f"{spelled(vectors)} {scene.shape}", 1)


# ---------------------------------------------------------------- the word in the encoders


def load_embedding(pipe: Any, state: dict[str, torch.Tensor], word: str = WORD) -> None:
    """Add ``word`` to ``pipe``'s tokenizers and text encoders with the vectors of an SDXL embedding file's
    ``state`` (``clip_l``, ``clip_g``), as diffusers documents it for SDXL."""
    pipe.load_textual_inversion(state["clip_l"], token=word, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=word, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def initial_vectors(pipe: Any, vectors: int) -> dict[str, torch.Tensor]:
    """Each encoder's vectors to start from: the mean of its rows for the two :data:`BETWEEN` words."""
    ids = [pipe.tokenizer.convert_tokens_to_ids(f"{name}</w>") for name in BETWEEN]
    state = {}
    for name, encoder in zip(TENSOR_NAMES, (pipe.text_encoder, pipe.text_encoder_2), strict=True):
        rows = encoder.get_input_embeddings().weight.detach()[ids].mean(dim=0, keepdim=True)
        state[name] = rows.repeat(vectors, 1).clone()
    return state


class NewRows(torch.nn.Module):
    """A token table whose first ``len(frozen)`` rows stay as they are and whose last rows are trained."""

    frozen: torch.Tensor

    def __init__(self, table: torch.nn.Embedding, new: int) -> None:
        super().__init__()
        weight = table.weight.detach()
        self.register_buffer("frozen", weight[:-new].clone())
        self.rows = torch.nn.Parameter(weight[-new:].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, torch.cat([self.frozen, self.rows]))


# ---------------------------------------------------------------- training


def train_embedding(
    model_dir: Path, out_dir: Path, settings: EmbeddingSettings, report: ProgressFn = _print
) -> dict[str, Any]:
    """Train the word on the saved model in ``model_dir`` (frozen) and save ``out_dir/<WORD>.safetensors``.
    Returns ``{"minutes", "sha256"}``. Torch's thread count (``threads`` while it runs) and determinism flag
    are put back after it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(model_dir, out_dir, settings, report)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(model_dir: Path, out_dir: Path, settings: EmbeddingSettings, report: ProgressFn) -> dict[str, Any]:
    started = time.monotonic()
    seed = settings.seed + 23
    base = TrainingSettings()  # the base model's noise, weighting and caption variants
    phase = dataclasses.replace(base, batch=settings.batch, warmup_steps=settings.warmup_steps,
                                outline_weight=settings.outline_weight)
    pipe = load_trained_pipeline(model_dir)
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
        module.eval()
    pool_at_end_of_text(pipe)
    load_embedding(pipe, initial_vectors(pipe, settings.vectors))
    tables = []
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        table = NewRows(encoder.get_input_embeddings(), settings.vectors)
        encoder.set_input_embeddings(table)
        tables.append(table)
    trainable = [table.rows for table in tables]
    scenes, latents = embedding_data(settings, base, report)
    report(f"embedding: {sum(p.numel() for p in trainable)} trained parameters ({settings.vectors} vector(s) "
           f"of {' and '.join(str(p.shape[1]) for p in trainable)})")
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    text = TextEncoding(pipe)
    schedule = NoiseSchedule(pipe.scheduler)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.ones(settings.batch, dtype=torch.bool)  # no dropped captions: without the word, nothing to learn

    def batch_loss() -> torch.Tensor:
        idx = [rng.randrange(len(scenes)) for _ in range(settings.batch)]
        captions = [word_caption(scenes[i], rng, base, settings.vectors) for i in idx]
        return denoising_loss(pipe, text, schedule, latents[idx], captions, keep, phase, generator)

    optimise(
        Progress("embedding", settings.steps, report), optimizer, batch_loss,
        lambda step: _learning_rate(step, phase, settings.steps, settings.learning_rate),
    )
    state = {name: table.rows.detach().to(torch.float32).contiguous() for name, table in zip(TENSOR_NAMES, tables,
                                                                                              strict=True)}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EMBEDDING_FILE
    save_file(state, str(path))
    path.chmod(0o644)  # safetensors writes 0600 whatever the umask; it ships, readable, as the other files do
    minutes = (time.monotonic() - started) / 60
    report(f"embedding: {minutes:.1f} min, {path} ({path.stat().st_size} bytes)")
    return {"minutes": round(minutes, 1), "sha256": sha256(path)}


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """An SDXL embedding file's tensors (``clip_l``, ``clip_g``)."""
    return load_file(str(path))


def update_record(
    record_path: Path, embedding_path: Path, settings: EmbeddingSettings, result: dict[str, Any]
) -> dict[str, Any]:
    """Put this phase's entry (:data:`RECORD_KEY`: the word, its colour, the file relative to the record, its
    SHA-256, the settings and the time taken) into ``training.json``; the rest of it stays as it is."""
    record: dict[str, Any] = json.loads(record_path.read_text())
    record[RECORD_KEY] = {
        "word": WORD,
        "rgb": list(COLOUR),
        "between": list(BETWEEN),
        "file": embedding_path.resolve().relative_to(record_path.resolve().parent).as_posix(),
        "sha256": result["sha256"],
        "minutes": result["minutes"],
        "settings": dataclasses.asdict(settings),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.train_embedding")
    parser.add_argument("out", type=Path, help="the embeddings' folder (e.g. imagen/data/demo/embeddings)")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="the saved demo model (diffusers)")
    parser.add_argument("--record", type=Path, default=None,
                        help="a training.json to add this phase's settings and the file's SHA-256 to")
    defaults = EmbeddingSettings()
    for field in dataclasses.fields(EmbeddingSettings):
        default = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    settings = EmbeddingSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EmbeddingSettings)})
    result = train_embedding(args.model, args.out, settings)
    if args.record is not None:
        update_record(args.record, args.out / EMBEDDING_FILE, settings, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
