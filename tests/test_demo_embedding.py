"""The demo embedding ``chartreuse`` (a textual inversion, ``training/train_embedding.py``), judged by meaning.

It is loaded into diffusers' own ``StableDiffusionXLPipeline`` as diffusers documents SDXL embeddings:
``load_textual_inversion`` of the file's ``clip_l`` into ``text_encoder``/``tokenizer`` and of its ``clip_g``
into ``text_encoder_2``/``tokenizer_2``. The prompts are the held-out ones: (shape, position, size) combinations
its training never showed. With the word, the shape's colour (the median of its interior,
:func:`training.judge.interior_colour`) is chartreuse, halfway between the palette's yellow and green: within
:data:`HALF_GAP` of it, so nearer it than any palette colour; with yellow or green in the word's place it never
is, and with no colour word it is farther from chartreuse than with the word; the background, the position and
the size still read right, and the shape nearly as often as with a palette colour. The pipeline pools the second
encoder at the end of text (:func:`training.train_embedding.pool_at_end_of_text`), as the embedding was trained.
1024 px, 12 steps, the demo model's guidance (7.5, rescaled by 0.7, stopped after 60 % of the steps, as the
engine runs it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imagen.generation.diffusers.guidance import callback_inputs, guided_steps, stop_guidance
from imagen.registry.demo_model import DEMO_DIR, DEMO_MODEL_DIR
from training import shapes
from training.judge import Verdict, interior_colour, judge, nearest_colour
from training.train_embedding import (
    BETWEEN,
    COLOUR,
    EMBEDDING_FILE,
    EMBEDDING_FOLDER,
    WORD,
    EmbeddingSettings,
    held_out_scenes,
    pool_at_end_of_text,
    prompt,
)

pytestmark = pytest.mark.engine

EMBEDDING_PATH = DEMO_DIR / EMBEDDING_FOLDER / EMBEDDING_FILE
STEPS = 12
GUIDANCE_STOP = 0.6
HALF_GAP = min(shapes.rgb_distance(COLOUR, rgb) for rgb in shapes.COLOURS.values()) / 2
"""59: a colour this close to chartreuse is nearer it than any palette colour. Nearest alone is not enough to say
chartreuse: asked for no colour, the demo model draws dull greys and olives, and 4 of 24 held-out pictures (RGB
(106, 152, 110), (104, 120, 63), (112, 109, 58), (126, 137, 68): 70 to 94 from chartreuse) were nearer it than
any palette colour when this was written."""
WORD_BAR = 0.85
"""Share of the held-out prompts on which the word's colour must be read. Measured when written: 8 of 8 here;
on all 24 held-out prompts (each place on each background) 24 of 24, at most 54 from chartreuse."""
SHAPE_SLACK = 2
"""The shape may be read right on two pictures fewer with the word than with a palette colour. Measured when
written: 4 of 8 with the word, 5 of 8 with yellow or green; on all 24 held-out prompts 14 with the word, 18 with
yellow and 19 with green (the word costs a little: some circles and squares come out as triangles and stars)."""
EXTRA = {WORD: COLOUR}


def load_pipeline() -> Any:
    """The demo model in float32 with the shared CLIP tokenizers, its configs as they are."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from imagen.generation.diffusers.components import load_clip_tokenizers

    tokenizer, tokenizer_2 = load_clip_tokenizers()
    pipe = StableDiffusionXLPipeline.from_pretrained(  # type: ignore[no-untyped-call]
        str(DEMO_MODEL_DIR), dtype=torch.float32, tokenizer=tokenizer, tokenizer_2=tokenizer_2
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> Any:
    from safetensors.torch import load_file

    pipe = load_pipeline()
    pool_at_end_of_text(pipe)
    state = load_file(str(EMBEDDING_PATH))
    pipe.load_textual_inversion(state["clip_l"], token=WORD, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=WORD, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return pipe


def draw(pipe: Any, text: str, seed: int) -> Image.Image:
    import torch

    def stop(pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if step + 1 == guided_steps(GUIDANCE_STOP, STEPS) < STEPS:
            tensors = stop_guidance(pipe, tensors)
        return tensors

    image: Image.Image = pipe(
        text, num_inference_steps=STEPS, guidance_scale=7.5, guidance_rescale=0.7,
        generator=torch.Generator().manual_seed(seed), callback_on_step_end=stop,
        callback_on_step_end_tensor_inputs=callback_inputs(pipe),
    ).images[0]
    return image


@dataclasses.dataclass(frozen=True)
class Reading:
    verdict: Verdict
    colour: str | None
    """The name of the shape's interior colour: chartreuse within :data:`HALF_GAP` of it, else the nearest
    palette colour (None: no shape found)."""
    distance: float
    """From the interior colour to chartreuse."""


def read(image: Image.Image) -> Reading:
    verdict = judge(image)
    interior = interior_colour(image, verdict)
    if interior is None:
        return Reading(verdict, None, math.inf)
    distance = shapes.rgb_distance(interior, COLOUR)
    if distance < HALF_GAP:
        assert nearest_colour(interior, EXTRA) == WORD
        return Reading(verdict, WORD, distance)
    return Reading(verdict, nearest_colour(interior), distance)


@pytest.fixture(scope="module")
def cases() -> list[shapes.Scene]:
    return held_out_scenes(EmbeddingSettings())


KINDS = ("word", "palette", "none")
"""Each held-out prompt with the word, with its palette colour (yellow or green) in the word's place, and with no
colour word."""


def colour_word(kind: str, scene: shapes.Scene) -> str | None:
    return WORD if kind == "word" else scene.colour if kind == "palette" else None


@pytest.fixture(scope="module")
def readings(pipe: Any, cases: list[shapes.Scene]) -> dict[str, list[Reading]]:
    """What was read on each held-out prompt, of each kind (:data:`KINDS`); the same seed for the three."""
    return {
        kind: [read(draw(pipe, prompt(scene, colour_word(kind, scene)), seed)) for seed, scene in enumerate(cases)]
        for kind in KINDS
    }


# ---------------------------------------------------------------- the file


def test_the_file_is_an_sdxl_embedding_of_the_demo_encoders_widths() -> None:
    """Two tensors, ``clip_l`` and ``clip_g``, as A1111 and civitai ship SDXL embeddings: (vectors, 8) and
    (vectors, 16), the demo encoders' widths. A safetensors file (a JSON header, then the raw numbers), no
    pickle."""
    data = EMBEDDING_PATH.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    widths = [json.loads((DEMO_MODEL_DIR / folder / "config.json").read_text())["hidden_size"]
              for folder in ("text_encoder", "text_encoder_2")]  # fmt: skip
    assert sorted(header) == ["clip_g", "clip_l"]
    vectors = header["clip_l"]["shape"][0]
    assert header["clip_l"]["shape"] == [vectors, widths[0]] and header["clip_g"]["shape"] == [vectors, widths[1]]
    assert {entry["dtype"] for entry in header.values()} <= {"F32", "F16"}
    end = max(entry["data_offsets"][1] for entry in header.values())
    assert len(data) == 8 + length + end  # nothing after the tensors' bytes
    assert not data.startswith(b"PK") and b"\x80\x02" not in data[: 8 + length]  # no torch zip, no pickle
    assert len(data) < 1024


def test_diffusers_adds_the_word_to_both_tokenizers_and_encoders(pipe: Any) -> None:
    from safetensors.torch import load_file

    state = load_file(str(EMBEDDING_PATH))
    vectors = state["clip_l"].shape[0]
    words = [WORD] + [f"{WORD}_{i}" for i in range(1, vectors)]  # diffusers' names for a multi-vector embedding
    for tokenizer, encoder, name in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                     (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):  # fmt: skip
        ids = tokenizer.convert_tokens_to_ids(words)
        assert ids == list(range(49408, 49408 + vectors))  # after the CLIP vocabulary
        assert WORD in tokenizer.tokenize(f"a large {WORD} circle")
        rows = encoder.get_input_embeddings().weight.detach()[ids]
        assert np.allclose(rows.numpy(), state[name].float().numpy())


def test_pooling_at_the_end_of_text_changes_nothing_without_the_word(pipe: Any) -> None:
    """:func:`pool_at_end_of_text` (the pooled embedding at the end-of-text token, not at the token of the
    highest id) gives the same embeddings as the model's own config for every prompt of the vocabulary."""
    import torch

    plain = load_pipeline()
    assert plain.text_encoder_2.config.eos_token_id == 2  # the legacy id, as SDXL's text_encoder_2 has it
    for text in ("a large yellow circle on the left on a white background", "a red star", ""):
        with torch.no_grad():
            ours = pipe.encode_prompt(text, do_classifier_free_guidance=False)
            theirs = plain.encode_prompt(text, do_classifier_free_guidance=False)
        for a, b in zip(ours, theirs, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


# ---------------------------------------------------------------- by meaning


def test_with_the_word_the_shape_is_chartreuse(readings: dict[str, list[Reading]]) -> None:
    colours = [reading.colour for reading in readings["word"]]
    assert sum(colour == WORD for colour in colours) >= WORD_BAR * len(colours), readings["word"]


def test_with_a_palette_colour_in_its_place_it_never_is(
    readings: dict[str, list[Reading]], cases: list[shapes.Scene]
) -> None:
    colours = [reading.colour for reading in readings["palette"]]
    assert colours == [scene.colour for scene in cases]  # each its own, yellow or green: never chartreuse
    assert {scene.colour for scene in cases} == set(BETWEEN)


def test_with_no_colour_word_it_is_not_chartreuse(readings: dict[str, list[Reading]]) -> None:
    """Asked for no colour, the demo model draws one of its own, dull (greys, olives, blue-purples), on every
    prompt farther from chartreuse than the same prompt's picture with the word. Measured when written: none of
    the 8 (nor of all 24 held-out prompts) within :data:`HALF_GAP` of chartreuse, the nearest at 60, just
    outside it (59.2): that one may cross it where the arithmetic differs (another CPU), hence "at most one"."""
    assert sum(reading.colour == WORD for reading in readings["none"]) <= 1, readings["none"]
    for without, with_word in zip(readings["none"], readings["word"], strict=True):
        assert without.distance > with_word.distance, (without, with_word)


def test_with_the_word_the_picture_still_reads_as_asked(
    readings: dict[str, list[Reading]], cases: list[shapes.Scene]
) -> None:
    """The background, the position and the size on every picture; the shape as often as with the palette
    colour in the word's place, less :data:`SHAPE_SLACK`."""
    verdicts = [reading.verdict for reading in readings["word"]]
    for scene, verdict in zip(cases, verdicts, strict=True):
        assert (verdict.background, verdict.position, verdict.size) == (scene.background, scene.position,
                                                                        scene.size), (scene, verdict)
    with_word = sum(v.shape == s.shape for s, v in zip(cases, verdicts, strict=True))
    with_palette = sum(r.verdict.shape == s.shape for s, r in zip(cases, readings["palette"], strict=True))
    assert with_word >= with_palette - SHAPE_SLACK, (with_word, with_palette)


def test_the_builtin_registry_serves_the_word_through_the_engine(
    cases: list[shapes.Scene], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """What a fresh install does with the word: the engine the worker runs loads it (and pools at the end of
    text) the first time a prompt writes it; the first held-out prompts draw chartreuse."""
    from imagen.generation.base import GenerationTask, InputImages
    from imagen.generation.diffusers.engine import DiffusersEngine
    from imagen.registry.builtin import DEMO_EMBEDDING_WORD, DEMO_MODEL_ID, builtin_registry
    from tests.engine_fixtures import engine_settings

    assert DEMO_EMBEDDING_WORD == WORD
    engine = DiffusersEngine(builtin_registry(), engine_settings(tmp_path_factory.mktemp("embedding-engine")))
    for seed, scene in enumerate(cases[:2]):
        task = GenerationTask(prompt=prompt(scene), negative_prompt=None, model=DEMO_MODEL_ID, steps=STEPS,
                              guidance_scale=7.5, seed=seed)
        [image] = engine.generate(task, lambda step, percent: None, InputImages())
        assert image.extra_metadata["embeddings"] == [WORD]
        colour = interior_colour(image.image, judge(image.image))
        assert colour is not None and shapes.rgb_distance(colour, COLOUR) < HALF_GAP, (scene, colour)
