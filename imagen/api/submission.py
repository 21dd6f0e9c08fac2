"""Turns a validated request into a job: checks it against the registry, fixes the seed and the file name.

Everything that would make a job fail for a reason visible now is refused here, with the field named.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from imagen.api.schemas import GenerationRequest
from imagen.config import Settings
from imagen.generation.base import GenerationTask, LoraChoice
from imagen.jobs.types import NewJob
from imagen.outputs.names import make_output_name
from imagen.registry import Registry
from imagen.webhooks.urls import TargetPolicy

RANDOM_SEED_LIMIT = 2**32  # random seeds stay short, like other SD tools' seeds


@dataclass(frozen=True)
class FieldError:
    loc: tuple[str | int, ...]
    message: str
    value: Any

    def as_pydantic_error(self) -> dict[str, Any]:
        return {"type": "value_error", "loc": ("body", *self.loc), "msg": self.message, "input": self.value}


class InvalidRequest(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(error.message for error in errors))
        self.errors = errors


def prepare_job(request: GenerationRequest, registry: Registry, settings: Settings, key_name: str = "") -> NewJob:
    errors: list[FieldError] = []
    model_id = request.model or registry.resolve_default_model(settings.default_model)
    model = registry.model(model_id)
    if model is None:
        errors.append(FieldError(
            ("model",), f"unknown model {model_id!r}; available: {', '.join(registry.model_ids)}", model_id
        ))
    if len(request.loras) > settings.max_loras:
        errors.append(FieldError(
            ("loras",), f"at most {settings.max_loras} LoRAs per request on this server (IMAGEN_MAX_LORAS), "
            f"not {len(request.loras)}", [lora.name for lora in request.loras],
        ))
    loras: list[LoraChoice] = []
    for index, wanted in enumerate(request.loras):
        spec = registry.lora(wanted.name)
        if spec is None:
            available = ", ".join(registry.lora_ids) or "none (no LoRA is configured on this server)"
            errors.append(FieldError(
                ("loras", index, "name"), f"unknown LoRA {wanted.name!r}; available: {available}", wanted.name
            ))
            continue
        weight = wanted.weight if wanted.weight is not None else spec.default_weight
        loras.append(LoraChoice(spec.id, weight))
    if request.ip_strength > 0:
        adapter = registry.ip_adapter
        if adapter is None:
            errors.append(FieldError(
                ("ip_strength",), "ip_strength > 0 needs an IP-Adapter and none is configured on this server "
                "(registry `ip_adapter:`); use 0.0", request.ip_strength,
            ))
        elif not adapter.reference_image.is_file():
            errors.append(FieldError(
                ("ip_strength",), "ip_strength > 0 needs the server's reference image, which is missing "
                f"({adapter.reference_image.name}); use 0.0", request.ip_strength,
            ))
    errors.extend(_webhook_errors(request, settings))
    if errors or model is None:
        raise InvalidRequest(errors)
    seed = request.seed if request.seed is not None else secrets.randbelow(RANDOM_SEED_LIMIT)
    task = GenerationTask(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        model=model.id,
        loras=tuple(loras),
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        seed=seed,
        ip_strength=request.ip_strength,
    )
    return NewJob(
        job_id=str(uuid.uuid4()),
        task=task.as_dict(),
        output_name=make_output_name(model.file_prefix),
        key_name=key_name,
    )


def _webhook_errors(request: GenerationRequest, settings: Settings) -> list[FieldError]:
    if request.webhook is None:
        return []  # a webhook_events_filter alone has nothing to filter
    if not settings.webhook_secret:
        return [FieldError(("webhook",), "this server sends no webhooks: it has no signing secret "
                           "(IMAGEN_WEBHOOK_SECRET)", request.webhook)]
    problem = TargetPolicy.parse(settings.webhook_allowed_hosts).url_problem(request.webhook)
    if problem is not None:
        return [FieldError(("webhook",), problem, request.webhook)]
    return []
