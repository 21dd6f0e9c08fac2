"""The demo ControlNet (``demo-silhouette``), judged by meaning through the engine a worker runs, on silhouettes
its training never showed, with prompts that name a colour and a background and no place: the drawn shape lies
on the silhouette, in the prompt's colour; at scale 0 the picture is the one without it; guiding only the late
steps weakens it; two silhouettes through two units both appear. 1024 px (the demo model's only size), 16 steps,
the demo model's guidance (stopped at 60 % of the steps, as for its other jobs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from imagen.generation.base import ControlNetChoice, GenerationTask, InputImages
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.registry.builtin import DEMO_CONTROLNET_ID, DEMO_MODEL_ID, builtin_registry
from tests.engine_fixtures import engine_settings
from training.controlnet_judge import (
    COLOUR_BAR,
    IOU_BAR,
    IOU_SHARE_BAR,
    READ_SIZE,
    TWO_UNIT_BAR,
    Case,
    drawn_mask,
    held_out_cases,
    iou,
    nearer,
    silhouette_mask,
    two_unit_cases,
)
from training.judge import judge
from training.train_controlnet import silhouette
from training.train_demo import TrainingSettings

pytestmark = pytest.mark.engine

PICTURES = 10
STEPS = 16


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    return DiffusersEngine(builtin_registry(), engine_settings(tmp_path_factory.mktemp("demo-controlnet")))


def draw(engine: DiffusersEngine, prompt: str, seed: int, controls: tuple[Image.Image, ...] = (),
         **unit: float) -> Image.Image:  # fmt: skip
    task = GenerationTask(
        prompt=prompt, negative_prompt=None, model=DEMO_MODEL_ID, steps=STEPS, guidance_scale=7.5, seed=seed,
        controlnets=tuple(ControlNetChoice(DEMO_CONTROLNET_ID, **unit) for _ in controls),  # type: ignore[arg-type]
    )
    image: Image.Image = engine.generate(task, lambda step, percent: None, InputImages(controls=controls))[0].image
    return image.resize((READ_SIZE, READ_SIZE), Image.Resampling.BOX)


def overlap(picture: Image.Image, case: Case) -> tuple[float, str]:
    verdict = judge(picture)
    return iou(drawn_mask(picture, verdict), silhouette_mask(case.silhouette)), verdict.colour


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return held_out_cases(PICTURES, seed=1, settings=TrainingSettings())


@pytest.fixture(scope="module")
def readings(engine: DiffusersEngine, cases: list[Case]) -> list[tuple[float, str]]:
    return [overlap(draw(engine, case.prompt, case.seed, (case.silhouette,)), case) for case in cases]


def test_the_shape_lies_on_the_held_out_silhouette_in_the_prompts_colour(
    readings: list[tuple[float, str]], cases: list[Case]
) -> None:
    overlaps = [value for value, _ in readings]
    assert sum(value >= IOU_BAR for value in overlaps) >= IOU_SHARE_BAR * len(cases), overlaps
    colours = [colour == case.scene.colour for (_, colour), case in zip(readings, cases, strict=True)]
    assert sum(colours) >= COLOUR_BAR * len(cases), [colour for _, colour in readings]


def test_at_scale_0_the_picture_is_the_one_without_the_controlnet(engine: DiffusersEngine, cases: list[Case]) -> None:
    case = cases[0]
    plain = draw(engine, case.prompt, case.seed)
    assert draw(engine, case.prompt, case.seed, (case.silhouette,), scale=0.0).tobytes() == plain.tobytes()
    assert overlap(plain, case)[0] < IOU_BAR  # without it the prompt alone places the shape elsewhere


def test_guiding_only_the_late_steps_weakens_it(
    engine: DiffusersEngine, cases: list[Case], readings: list[tuple[float, str]]
) -> None:
    late = [overlap(draw(engine, case.prompt, case.seed, (case.silhouette,), start=0.7), case)[0]
            for case in cases[:4]]  # fmt: skip
    assert np.mean(late) < np.mean([value for value, _ in readings[:4]]) - 0.2, late


def test_two_silhouettes_through_two_units_both_appear(engine: DiffusersEngine) -> None:
    first, second = two_unit_cases()[0]
    maps = (silhouette(first, 256), silhouette(second, 256))
    picture = draw(engine, f"a {first.colour} shape on a {first.background} background", 3, maps)
    verdict = judge(picture)
    drawn = drawn_mask(picture, verdict)
    masks = [silhouette_mask(image) for image in maps]
    sides = nearer(*masks)
    for mask, side in zip(masks, sides, strict=True):
        assert iou(drawn & side, mask) >= TWO_UNIT_BAR


def test_the_guidance_stop_still_applies(engine: DiffusersEngine, cases: list[Case]) -> None:
    case = cases[0]
    task = dataclasses.replace(
        GenerationTask(prompt=case.prompt, negative_prompt=None, model=DEMO_MODEL_ID, steps=STEPS,
                       guidance_scale=7.5, seed=case.seed),
        controlnets=(ControlNetChoice(DEMO_CONTROLNET_ID),),
    )  # fmt: skip
    metadata = engine.generate(task, lambda step, percent: None, InputImages(controls=(case.silhouette,)))[0]
    assert metadata.extra_metadata["guidance_stop"] == 0.6
