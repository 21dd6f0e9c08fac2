"""Guidance that stops part-way: classifier-free guidance for the first steps of the denoising loop only.

A registry entry's ``guidance_stop`` (a fraction of the loop's steps, as the ``stop`` of diffusers' own
guiders) ends classifier-free guidance after that share of the steps. From then on each step runs the UNet on
the prompt alone, the pipeline's way of running without guidance (``guidance_scale`` at most 1): the
unconditional half of the batch is dropped, so those steps cost half as much. Guidance settles the picture's
layout and colours in the noisy first steps; in the last ones it only sharpens, and on a small model it
exaggerates outlines (Kynkäänniemi et al. 2024, *Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models*).

It is done as diffusers' documentation does it ("dynamic classifier-free guidance", with
``callback_on_step_end``): at the cut, the callback keeps the prompt's half of every tensor that holds both
halves and sets the pipeline's guidance scale to 1. An IP-Adapter's image embeddings hold both halves too,
but the pipeline does not hand them to the callback, so a job with an IP-Adapter image is guided to the end.
"""

from __future__ import annotations

from typing import Any

from imagen.generation.base import GenerationTask
from imagen.registry import ModelSpec

HALVED_INPUTS = (
    "prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "masked_image_latents", "image", "control_image"
)
"""What the SDXL pipelines (txt2img, img2img, inpainting, and the ControlNet ones' control images: ``image`` in
txt2img, ``control_image`` in img2img, a list with several ControlNets) hold twice under guidance, negative half
first, and hand to ``callback_on_step_end`` when asked for them."""

STOPPABLE_CONTROLNET_PIPELINES = frozenset(
    {"StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline"}
)
"""The ControlNet pipelines whose step callback hands out and takes back every doubled tensor, the control
image included. The others (inpainting, the Union ones) keep some to themselves: their jobs are guided to the
end."""


def guidance_stop(spec: ModelSpec, task: GenerationTask, ip_kwargs: dict[str, Any], pipe: Any) -> float | None:
    """Where this job's guidance stops (a fraction of its steps), or None: guided to the end, as the model's
    ``guidance_stop`` is 1, the job is not guided (scale at most 1), it uses an IP-Adapter (whose image
    embeddings the pipeline does not let a callback halve), or its ControlNet pipeline keeps a doubled tensor
    from the callback."""
    if spec.guidance_stop >= 1 or task.guidance_scale <= 1 or ip_kwargs:
        return None
    is_controlnet = getattr(pipe, "controlnet", None) is not None
    if is_controlnet and type(pipe).__name__ not in STOPPABLE_CONTROLNET_PIPELINES:
        return None
    return spec.guidance_stop


def guided_steps(stop: float, total: int) -> int:
    """How many of ``total`` loop steps are guided when guidance stops at ``stop`` (at least one)."""
    return max(1, min(total, round(stop * total)))


def callback_inputs(pipe: Any) -> list[str]:
    """The ``callback_on_step_end_tensor_inputs`` that :func:`stop_guidance` needs from ``pipe``."""
    offered = getattr(pipe, "_callback_tensor_inputs", ())
    return ["latents", *(name for name in HALVED_INPUTS if name in offered)]


def stop_guidance(pipe: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """From the next step on, no guidance: keep the prompt's half of each doubled tensor in ``tensors``
    (the callback's keyword arguments, returned) and set the pipeline's guidance scale to 1."""
    for name in HALVED_INPUTS:
        value = tensors.get(name)
        if isinstance(value, list):  # one control image per ControlNet
            tensors[name] = [item.chunk(2)[1] for item in value]
        elif value is not None:
            tensors[name] = value.chunk(2)[1]
    pipe._guidance_scale = 1.0
    return tensors
