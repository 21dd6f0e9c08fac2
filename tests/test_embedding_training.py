"""``python -m training.train_embedding``: the demo embedding's data and training (a few steps, twice: the same
file, which diffusers loads and draws with), its record in ``training.json``, and the shipped one's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from imagen.registry.builtin import TRAINING_RECORD
from imagen.registry.demo_model import DEMO_DIR, DEMO_MODEL_DIR
from training import shapes
from training.train_embedding import (
    BACKGROUNDS,
    COLOUR,
    EMBEDDING_FILE,
    EMBEDDING_FOLDER,
    RECORD_KEY,
    WORD,
    EmbeddingSettings,
    held_out_places,
    held_out_scenes,
)

pytestmark = pytest.mark.engine

TINY = EmbeddingSettings(steps=3, batch=4, warmup_steps=2, scenes=40)


def test_the_word_is_new_and_its_colour_lies_halfway_between_two_palette_colours() -> None:
    from imagen.generation.diffusers.components import load_clip_tokenizers

    tokenizer, _ = load_clip_tokenizers()
    assert WORD not in tokenizer.get_vocab() and f"{WORD}</w>" not in tokenizer.get_vocab()
    assert COLOUR == (132, 198, 35)
    assert min(shapes.rgb_distance(COLOUR, rgb) for rgb in shapes.COLOURS.values()) > 110
    assert BACKGROUNDS == ("white", "beige", "sky blue")


def test_a_recoloured_picture_is_the_picture_drawn_in_the_new_colour() -> None:
    """The cells of a scene recoloured by coverage are those of the same drawing with the shape filled in
    :data:`COLOUR` (each pixel moved from the background by its share of the shape)."""
    from training.train_demo import cell_means
    from training.train_embedding import recolour_cells

    scene = shapes.Scene("star", "purple", "beige", "on the left", "large")
    picture = np.asarray(shapes.render(scene, 256, np.random.default_rng(2)), dtype=np.float32)
    colour = np.asarray(shapes.COLOURS["purple"], dtype=np.float32)
    background = np.asarray(shapes.BACKGROUNDS["beige"], dtype=np.float32)
    direction = colour - background
    share = np.clip((picture - background) @ direction / float(direction @ direction), 0, 1)[..., None]
    redrawn = background + share * (np.asarray(COLOUR, dtype=np.float32) - background)
    expected = (redrawn / 127.5 - 1).reshape(32, 8, 32, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    got = recolour_cells(cell_means(shapes.render(scene, 256, np.random.default_rng(2))), scene, COLOUR)
    assert np.abs(got - expected).max() < 1e-4


def test_the_held_out_places_are_never_trained_on() -> None:
    from training.train_demo import TrainingSettings
    from training.train_embedding import embedding_data

    scenes, latents = embedding_data(TINY, TrainingSettings(), lambda line: None)
    held = set(held_out_places(TINY.seed + 23, TINY.held_out_per_shape))
    assert len(held) == 4 * TINY.held_out_per_shape
    assert all((s.shape, s.position, s.size) not in held and s.background in BACKGROUNDS for s in scenes)
    assert latents.shape == (len(scenes), 4, 32, 32) and len(scenes) == TINY.scenes
    assert {(s.shape, s.position, s.size) for s in held_out_scenes(TINY)} == held


@pytest.mark.timeout(300)
def test_training_is_deterministic_and_diffusers_loads_the_file(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from training.train_demo import load_trained_pipeline
    from training.train_embedding import pool_at_end_of_text, train_embedding, update_record

    lines: list[str] = []
    threads = torch.get_num_threads()
    first = train_embedding(DEMO_MODEL_DIR, tmp_path / "one", TINY, report=lines.append)
    second = train_embedding(DEMO_MODEL_DIR, tmp_path / "two", TINY, report=lambda line: None)
    assert first["sha256"] == second["sha256"]
    assert [p.name for p in (tmp_path / "one").iterdir()] == [EMBEDDING_FILE]
    assert any("embedding: 3/3" in line for line in lines)
    assert torch.get_num_threads() == threads  # one while it trained (threads), put back after

    state = load_file(str(tmp_path / "one" / EMBEDDING_FILE))
    assert {name: tuple(t.shape) for name, t in state.items()} == {"clip_l": (1, 8), "clip_g": (1, 16)}
    pipe = load_trained_pipeline(DEMO_MODEL_DIR)
    pool_at_end_of_text(pipe)
    pipe.load_textual_inversion(state["clip_l"], token=WORD, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=WORD, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    image = pipe(f"a large {WORD} circle on the left on a white background", num_inference_steps=2, height=256,
                 width=256).images[0]
    assert image.size == (256, 256)

    record = tmp_path / TRAINING_RECORD
    original = {"settings": {"seed": 0}, "weights": {"model/unet/x.safetensors": "abc"}, "lora": {"file": "x"}}
    record.write_text(json.dumps(original))
    written = update_record(record, tmp_path / "one" / EMBEDDING_FILE, TINY, first)
    assert {key: written[key] for key in original} == original  # the other phases' entries as they were
    assert written[RECORD_KEY] == {
        "word": WORD, "rgb": list(COLOUR), "between": ["yellow", "green"], "file": f"one/{EMBEDDING_FILE}",
        "sha256": first["sha256"], "minutes": first["minutes"], "settings": dataclasses.asdict(TINY),
    }
    assert json.loads(record.read_text()) == written


def test_the_shipped_embedding_is_the_one_the_training_command_recorded() -> None:
    from training.train_demo import sha256

    record = json.loads((DEMO_DIR / TRAINING_RECORD).read_text())[RECORD_KEY]
    path = DEMO_DIR / EMBEDDING_FOLDER / EMBEDDING_FILE
    assert record["file"] == f"{EMBEDDING_FOLDER}/{EMBEDDING_FILE}"
    assert record["sha256"] == sha256(path)
    assert record["settings"] == dataclasses.asdict(EmbeddingSettings())  # the command's defaults
    assert (record["word"], record["rgb"]) == (WORD, list(COLOUR))
