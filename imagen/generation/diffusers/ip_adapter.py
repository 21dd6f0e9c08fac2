"""The registry's IP-Adapter: read once per worker, attached to a pipeline only while a job uses it.

Its weights, CLIP vision encoder and reference image are read on the first job that asks ``ip_strength``
> 0 and kept in RAM (:func:`load_ip_adapter_weights`). A pipeline gets the adapter's attention processors
and image encoder while jobs ask for it (:func:`attach_ip_adapter`) and loses them on the first job that
does not (:func:`detach_ip_adapter`), so a job without IP-Adapter runs exactly as if none existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection

from imagen.errors import FatalGenerationError
from imagen.registry import IpAdapterSpec, safe_files


@dataclass
class IpAdapterWeights:
    state_dict: dict[str, dict[str, torch.Tensor]]  # {"image_proj": {...}, "ip_adapter": {...}}
    image_encoder: CLIPVisionModelWithProjection
    reference: Image.Image


def load_ip_adapter_weights(spec: IpAdapterSpec | None) -> IpAdapterWeights:
    if spec is None:
        raise FatalGenerationError("ip_strength > 0 but no ip_adapter is configured in the registry")
    try:
        safe_files.read_safetensors_header(spec.path)
        safe_files.check_weights_folder(spec.image_encoder_path)
        safe_files.check_image(spec.reference_image)
    except safe_files.UnsafeFileError as exc:
        raise FatalGenerationError(f"IP-Adapter: {exc}") from exc
    raw = load_file(str(spec.path))
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in raw.items():
        group, _, rest = key.partition(".")
        if group in state:
            state[group][rest] = value
    if not state["image_proj"] or not state["ip_adapter"]:
        raise FatalGenerationError(f"IP-Adapter {spec.path}: expected image_proj.* and ip_adapter.* tensors")
    encoder = CLIPVisionModelWithProjection.from_pretrained(
        str(spec.image_encoder_path), use_safetensors=True, local_files_only=True
    )
    encoder.eval()  # type: ignore[no-untyped-call]
    with Image.open(spec.reference_image) as opened:
        reference = opened.convert("RGB")
    return IpAdapterWeights(state_dict=state, image_encoder=encoder, reference=reference)


def attach_ip_adapter(pipe: Any, weights: IpAdapterWeights, device: torch.device, dtype: torch.dtype) -> None:
    encoder = weights.image_encoder.to(device=device, dtype=dtype)  # type: ignore[call-arg]
    pipe.register_modules(image_encoder=encoder)
    pipe.load_ip_adapter(
        weights.state_dict,
        subfolder="",
        weight_name="ip_adapter.safetensors",
        image_encoder_folder=None,
    )


def detach_ip_adapter(pipe: Any) -> None:
    pipe.unload_ip_adapter()
