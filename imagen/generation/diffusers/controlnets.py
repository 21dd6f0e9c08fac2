"""ControlNets: read from the registry's files, and the arguments of a ControlNet pipeline's call for a job.

A ControlNet is a diffusers folder or one ``.safetensors`` file, in diffusers' key layout or the original one
(``from_single_file`` converts it), built from the shipped SDXL ControlNet configs (``imagen/data/
sdxl-controlnet*``) or a sibling ``<file>.config/`` folder, with no download. A ControlNet Union (xinsir's
ControlNet++) is a ``ControlNetUnionModel``; a single file of one is read by hand (diffusers has no
single-file loader for it), its number of control types taken from its ``task_embedding``.

The engine runs a job's ControlNets through diffusers' ControlNet pipelines, made from the loaded model with
``from_pipe`` (the same component objects: no second copy of any weight); this module says which pipeline a
job needs (:func:`pipeline_class`) and what its call takes (:func:`call_arguments`): the control maps, one per
unit, made by the unit's preprocessor and fitted to the picture (:mod:`imagen.inputs.control_maps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel
from PIL import Image
from safetensors.torch import load_file

from imagen.errors import FatalGenerationError, is_out_of_memory
from imagen.generation.base import ControlNetChoice
from imagen.generation.diffusers.components import DATA_DIR
from imagen.generation.diffusers.loading import sibling_config_dir
from imagen.inputs.control_maps import detect, fit
from imagen.registry import ControlNetSpec, safe_files
from imagen.registry.specs import UNION_CONTROL_TYPES

SDXL_CONTROLNET_CONFIG_DIR = DATA_DIR / "sdxl-controlnet"
SDXL_CONTROLNET_UNION_CONFIG_DIR = DATA_DIR / "sdxl-controlnet-union"

# The pipeline of each mode, for plain ControlNets and for ControlNet Union models.
_PIPELINES: dict[tuple[bool, str], str] = {
    (False, "txt2img"): "StableDiffusionXLControlNetPipeline",
    (False, "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    (False, "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
    (True, "txt2img"): "StableDiffusionXLControlNetUnionPipeline",
    (True, "img2img"): "StableDiffusionXLControlNetUnionImg2ImgPipeline",
    (True, "inpaint"): "StableDiffusionXLControlNetUnionInpaintPipeline",
}


def load_controlnet(spec: ControlNetSpec, dtype: torch.dtype) -> Any:
    """Read a registry ControlNet (on CPU, in ``dtype``)."""
    path = Path(spec.path)
    try:
        safe_files.check_controlnet_path(path)
    except safe_files.UnsafeFileError as exc:
        raise FatalGenerationError(f"ControlNet {spec.id!r}: {exc}") from exc
    model_class = diffusers.ControlNetUnionModel if spec.is_union else diffusers.ControlNetModel
    try:
        if path.is_dir():
            model = model_class.from_pretrained(  # type: ignore[no-untyped-call]
                str(path), dtype=dtype, use_safetensors=True, local_files_only=True
            )
        elif spec.is_union:
            model = _union_from_single_file(path, dtype)
        else:
            config = sibling_config_dir(path) or SDXL_CONTROLNET_CONFIG_DIR
            model = model_class.from_single_file(str(path), config=str(config), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if is_out_of_memory(exc):
            raise
        raise FatalGenerationError(f"ControlNet {spec.id!r} could not be loaded: {exc}") from exc
    if spec.is_union:
        _check_control_types(spec, model)
    model.eval()
    return model


def _union_from_single_file(path: Path, dtype: torch.dtype) -> Any:
    state = load_file(str(path))
    config_dir = sibling_config_dir(path) or SDXL_CONTROLNET_UNION_CONFIG_DIR
    config = dict(diffusers.ControlNetUnionModel.load_config(str(config_dir)))
    task_embedding = state.get("task_embedding")
    if task_embedding is not None:
        config["num_control_type"] = int(task_embedding.shape[0])
    model = diffusers.ControlNetUnionModel.from_config(config)  # type: ignore[no-untyped-call]
    model.load_state_dict(state, strict=True)
    return model.to(dtype=dtype)


def _check_control_types(spec: ControlNetSpec, model: Any) -> None:
    count = int(model.config.num_control_type)
    beyond = [name for name in spec.control_types or () if UNION_CONTROL_TYPES.index(name) >= count]
    if beyond:
        raise FatalGenerationError(
            f"ControlNet {spec.id!r} knows {count} control types ({', '.join(UNION_CONTROL_TYPES[:count])}); "
            f"its registry entry lists {', '.join(beyond)}"
        )


def pipeline_class(union: bool, mode: str) -> Any:
    """The diffusers pipeline that runs ``mode`` ("txt2img", "img2img", "inpaint") with ControlNets."""
    return getattr(diffusers, _PIPELINES[(union, mode)])


@dataclass(frozen=True)
class Unit:
    """One unit of a job, ready to run: its choice, its registry entry and its fitted control map."""

    choice: ControlNetChoice
    spec: ControlNetSpec
    control_map: Image.Image


def control_map(choice: ControlNetChoice, image: Image.Image, width: int, height: int) -> Image.Image:
    """What the unit's preprocessor makes of its control image, fitted to the picture by its resize mode."""
    detected = detect(image, choice.preprocessor, choice.low_threshold, choice.high_threshold, choice.processor_res)
    return fit(detected, width, height, choice.resize_mode)


def call_arguments(mode: str, units: Sequence[Unit]) -> dict[str, Any]:
    """The ControlNet arguments of the pipeline call (one unit: plain values; several: one list entry each)."""
    union = units[0].spec.is_union
    # txt2img's pipeline takes the control map as ``image``; img2img's and inpainting's take their init
    # image there and the map as ``control_image``; the Union pipelines always call it ``control_image``.
    image_argument = "image" if mode == "txt2img" and not union else "control_image"
    single = len(units) == 1
    arguments: dict[str, Any] = {
        "controlnet_conditioning_scale": units[0].choice.scale if single else [u.choice.scale for u in units],
        "control_guidance_start": units[0].choice.start if single else [u.choice.start for u in units],
        "control_guidance_end": units[0].choice.end if single else [u.choice.end for u in units],
    }
    if union:
        # a list of maps and their control types, one each per unit (the pipeline gives each of several
        # Union models its own)
        arguments[image_argument] = [u.control_map for u in units]
        arguments["control_mode"] = [UNION_CONTROL_TYPES.index(str(u.choice.control_type)) for u in units]
    else:
        maps_only = [u.control_map for u in units]
        arguments[image_argument] = maps_only[0] if single else maps_only
    return arguments


def combined(models: Sequence[Any], union: bool) -> Any:
    """The ``controlnet`` of a pipeline for these models: the one, or diffusers' Multi- wrapper around them."""
    if len(models) == 1:
        return models[0]
    if union:
        return MultiControlNetUnionModel(list(models))
    return MultiControlNetModel(list(models))
