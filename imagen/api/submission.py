"""Turns a validated request into a job: checks it against the registry, fixes the seed and the file name.

Everything that would make a job fail for a reason visible now is refused here, with the field named.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from imagen.api.schemas import ControlNetUnit, GenerationRequest, UpscaleRequest
from imagen.config import Settings
from imagen.generation.base import (
    ControlNetChoice,
    GenerationTask,
    HiresChoice,
    LoraChoice,
    RefinerChoice,
    UpscaleChoice,
    control_role,
)
from imagen.generation.samplers import available_samplers
from imagen.inputs.control_maps import PREPROCESSORS
from imagen.inputs.images import (
    BadImage,
    CheckedImage,
    check_image,
    decode_data_url,
    flatten,
    mask_from,
    mask_from_alpha,
    to_png,
)
from imagen.inputs.sizes import hires_size, output_size_problem, size_from_image, size_problem
from imagen.jobs.types import NewJob, Upload
from imagen.outputs.names import image_names, make_output_name
from imagen.registry import (
    REFERENCE_GUIDANCE,
    REFERENCE_STEPS,
    GuidanceRange,
    LoraSpec,
    ModelSpec,
    Registry,
    StepRange,
)
from imagen.webhooks.urls import TargetPolicy

RANDOM_SEED_LIMIT = 2**32  # random seeds stay short, like other SD tools' seeds
DEFAULT_STRENGTH = 0.75  # img2img / inpainting, as AUTOMATIC1111
UPLOAD_PREFIX = "upload:"


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


# Finds an upload by id for the caller (None: unknown, expired, or another key's).
UploadLookup = Callable[[str], Upload | None]


def prepare_job(
    request: GenerationRequest,
    registry: Registry,
    settings: Settings,
    key_name: str = "",
    uploads: UploadLookup = lambda upload_id: None,
) -> NewJob:
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
        names = {e.name.lower() for e in registry.embeddings}
        clashing = [word for word in spec.trigger_words or [] if word.lower() in names]
        if clashing:
            errors.append(FieldError(
                ("loras", index, "name"), f"LoRA {spec.id!r}'s trigger word {clashing[0]!r} is also an embedding's "
                "name on this server: the prompt would use both; ask the server's operator to rename one",
                wanted.name,
            ))
    if request.ip_strength > 0:
        adapter = registry.ip_adapter
        if adapter is None:
            errors.append(FieldError(
                ("ip_strength",), "ip_strength > 0 needs an IP-Adapter and none is configured on this server "
                "(registry `ip_adapter:`); use 0.0", request.ip_strength,
            ))
        elif request.ip_image is None and not adapter.reference_image.is_file():
            errors.append(FieldError(
                ("ip_strength",), "ip_strength > 0 needs the server's reference image, which is missing "
                f"({adapter.reference_image.name}); use 0.0", request.ip_strength,
            ))
    sampling = _sampling(request, model, [spec for spec in map(registry.lora, lora_names(request)) if spec], errors)
    controlnets = _controlnet_choices(request.controlnets, model, registry, settings, errors)
    errors.extend(_webhook_errors(request, settings))
    errors.extend(_sdxl_option_errors(request))
    images = _RequestImages(request, key_name, uploads, errors)
    hires = _hires_choice(request, model, images, registry, settings, sampling.steps if sampling else 0, errors)
    refiner = _refiner_choice(request, model, images, registry, errors)
    if errors or model is None or sampling is None:
        raise InvalidRequest(errors)
    seed = request.seed if request.seed is not None else secrets.randbelow(RANDOM_SEED_LIMIT)
    size = images.size
    task = GenerationTask(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        model=model.id,
        loras=tuple(loras),
        steps=sampling.steps,
        guidance_scale=sampling.guidance_scale,
        seed=seed,
        ip_strength=request.ip_strength,
        width=size[0] if size else None,
        height=size[1] if size else None,
        num_images=request.num_images,
        scheduler=sampling.scheduler,
        clip_skip=request.clip_skip,
        strength=(request.strength if request.strength is not None else DEFAULT_STRENGTH) if images.init else None,
        init_image="init" in images.pngs,
        mask_image="mask" in images.pngs,
        ip_image="ip" in images.pngs,
        controlnets=controlnets,
        defaults_from=sampling.defaults_from,
        hires=hires,
        refiner=refiner,
    )
    output_name = make_output_name(model.file_prefix)
    return NewJob(
        job_id=str(uuid.uuid4()),
        task=task.as_dict(),
        output_name=output_name,
        key_name=key_name,
        inputs=images.pngs,
        output_names=tuple(image_names(output_name, request.num_images)),
    )


UPSCALE_PREFIX = "upscale"  # file names of POST /upscale's results: upscale_YYYYMMDD_HHMMSS_xxxxxxxx.png


def prepare_upscale(
    request: UpscaleRequest,
    registry: Registry,
    settings: Settings,
    key_name: str = "",
    uploads: UploadLookup = lambda upload_id: None,
) -> NewJob:
    """POST /upscale's job: the picture checked and stored as the job's ``init`` input, the upscaler known, the
    result's size within IMAGEN_MAX_OUTPUT_PIXELS. It runs on the queue as any job (no model is loaded)."""
    errors: list[FieldError] = []
    if request.upscaler not in registry.upscaler_ids or request.upscaler == "latent":
        available = [name for name in registry.upscaler_ids if name != "latent"]
        errors.append(FieldError(
            ("upscaler",), f"unknown upscaler {request.upscaler!r}; available: {', '.join(available)} (latent is "
            "for the hires fix: an upscale has no latents)", request.upscaler,
        ))
    try:
        picture = load_image(request.image, key_name, uploads)
    except BadImage as exc:
        errors.append(FieldError(("image",), str(exc), request.image[:64] + ("…" if len(request.image) > 64 else "")))
        raise InvalidRequest(errors) from exc
    target = hires_size(picture.width, picture.height, request.scale, request.width, request.height, step=1)
    problem = output_size_problem(*target, settings.max_output_pixels)
    if problem is not None:
        field = "width" if request.width else ("height" if request.height else "scale")
        errors.append(FieldError((field,), f"the upscaled picture: {problem}", getattr(request, field)))
    if errors:
        raise InvalidRequest(errors)
    targeted = request.width is not None or request.height is not None
    task = GenerationTask(
        prompt="", negative_prompt=None, model=registry.resolve_default_model(settings.default_model), steps=1,
        guidance_scale=1.0, seed=0, init_image=True,
        upscale=UpscaleChoice(width=target[0], height=target[1], upscaler=request.upscaler,
                              scale=None if targeted else request.scale),
    )  # fmt: skip
    output_name = make_output_name(UPSCALE_PREFIX)
    return NewJob(
        job_id=str(uuid.uuid4()), task=task.as_dict(), output_name=output_name, key_name=key_name,
        inputs={"init": to_png(flatten(picture.image))}, output_names=(output_name,),
    )


def load_image(value: str, key_name: str, uploads: UploadLookup) -> CheckedImage:
    """A request's image: a data URL, bare base64 or ``upload:<id>`` of the caller's; checked (format by content,
    size and bomb limits). Raises ``BadImage``."""
    if value.startswith(UPLOAD_PREFIX):
        upload = uploads(value.removeprefix(UPLOAD_PREFIX))
        if upload is None or upload.key_name != key_name:
            raise BadImage(
                f"unknown or expired upload {value!r} (uploads are kept IMAGEN_UPLOAD_TTL_S seconds; "
                "send it again with POST /uploads)"
            )
        return check_image(upload.data)
    return check_image(decode_data_url(value))


def _refiner_choice(
    request: GenerationRequest,
    model: ModelSpec | None,
    images: _RequestImages,
    registry: Registry,
    errors: list[FieldError],
) -> RefinerChoice | None:
    """The job's refiner: the request's, else (when the request does not say ``"refiner": null``) the model's
    default; checked: a refiner entry that fits the model, text-to-image without ControlNets or hires fix."""
    if model is None:
        return None
    if model.refiner:
        fitting = [m.id for m in registry.models if not m.refiner and m.base == model.base]
        errors.append(FieldError(
            ("model",), f"model {model.id!r} is an SDXL refiner: it only finishes other models' pictures; give "
            f"it as refiner.model with one of: {', '.join(fitting) or 'none'}", model.id,
        ))
        return None
    wanted = request.refiner
    if wanted is None:
        if "refiner" in request.model_fields_set or model.default_refiner is None:
            return None
        choice = RefinerChoice(model=model.default_refiner)
    else:
        choice = RefinerChoice(model=wanted.model, switch_at=wanted.switch_at)
    spec = registry.model(choice.model)
    refiners = ", ".join(r.id for r in registry.refiners_for(model)) or "none"
    if spec is None or not spec.refiner or spec.base != model.base:
        what = "unknown" if spec is None else ("not a refiner" if not spec.refiner else f"for {spec.base} models")
        errors.append(FieldError(
            ("refiner", "model"), f"{choice.model!r} is {what}; the refiners that fit model {model.id!r}: {refiners}",
            choice.model,
        ))
    for given, field in ((images.init, "init_image"), (request.controlnets, "controlnets"), (request.hires, "hires")):
        if given:
            errors.append(FieldError(
                ("refiner",), f"the refiner finishes text-to-image jobs without {field} here: leave out one of "
                f"refiner and {field} (or send \"refiner\": null)", "refiner",
            ))
    return choice


def _hires_choice(
    request: GenerationRequest,
    model: ModelSpec | None,
    images: _RequestImages,
    registry: Registry,
    settings: Settings,
    job_steps: int,
    errors: list[FieldError],
) -> HiresChoice | None:
    """The request's hires fix resolved to its final size, checked: text-to-image only, a known upscaler, a
    final size within IMAGEN_MAX_OUTPUT_PIXELS."""
    hires = request.hires
    if hires is None or model is None:
        return None
    if images.init:
        errors.append(FieldError(
            ("hires",), "the hires fix is for text-to-image: leave it out with init_image (give the larger size "
            "to img2img instead)", "hires",
        ))
    if request.controlnets:
        errors.append(FieldError(
            ("hires",), "the hires fix does not run with ControlNets here yet: leave out hires or controlnets",
            "hires",
        ))
    if hires.upscaler not in registry.upscaler_ids:
        errors.append(FieldError(
            ("hires", "upscaler"), f"unknown upscaler {hires.upscaler!r}; available: "
            f"{', '.join(registry.upscaler_ids)}", hires.upscaler,
        ))
    width, height = images.size or (model.size, model.size)
    final = hires_size(width, height, hires.scale, hires.width, hires.height)
    problem = output_size_problem(*final, settings.max_output_pixels)
    if problem is not None:
        field = "scale" if hires.width is None and hires.height is None else ("width" if hires.width else "height")
        errors.append(FieldError(("hires", field), f"the hires fix's final size: {problem}", getattr(hires, field)))
    steps = hires.steps or job_steps
    if job_steps and int(steps * hires.denoise) < 1:
        errors.append(FieldError(
            ("hires", "denoise"), f"denoise {hires.denoise} of {steps} steps runs no step: at least "
            f"{1 / steps:.3g}", hires.denoise,
        ))
    targeted = hires.width is not None or hires.height is not None
    return HiresChoice(
        width=final[0], height=final[1], upscaler=hires.upscaler, steps=hires.steps or 0, denoise=hires.denoise,
        scale=None if targeted else hires.scale,
    )


def lora_names(request: GenerationRequest) -> list[str]:
    return [lora.name for lora in request.loras]


@dataclass(frozen=True)
class Sampling:
    """A job's steps, guidance and sampler: the request's, else what its LoRAs or its model need."""

    steps: int
    guidance_scale: float
    scheduler: str | None
    defaults_from: tuple[tuple[str, str], ...]


def _sampling(
    request: GenerationRequest, model: ModelSpec | None, loras: list[LoraSpec], errors: list[FieldError]
) -> Sampling | None:
    """The job's steps, guidance and sampler, each checked against the range that applies: a LoRA's needs
    (an LCM-LoRA: 4-8 steps) where one states them, else the model's own (the reference's unless its entry
    sets another). A setting the request leaves out takes that range's default, and ``defaults_from`` says
    whose it was when it is not the reference's."""
    if model is None:
        return None
    sent = request.model_fields_set
    defaults_from: list[tuple[str, str]] = []
    ranges: list[tuple[StepRange | GuidanceRange, str]] = []
    for name, model_range, reference in (
        ("steps", model.steps, REFERENCE_STEPS), ("guidance_scale", model.guidance_scale, REFERENCE_GUIDANCE)
    ):
        stated = [(getattr(spec.needs, name), spec) for spec in loras if spec.needs and getattr(spec.needs, name)]
        if stated:
            low, high = max(r.min for r, _ in stated), min(r.max for r, _ in stated)
            if low > high:
                errors.append(FieldError(
                    ("loras",), f"these LoRAs need {name} ranges with nothing in common: "
                    + "; ".join(f"{spec.id} {r.min}-{r.max}" for r, spec in stated), lora_names(request),
                ))
                return None
            first, spec = stated[0]
            ranges.append((type(first)(min=low, max=high, default=min(max(first.default, low), high)),
                           f"LoRA {spec.id}"))
        else:
            ranges.append((model_range, "" if model_range == reference else f"model {model.id}"))
    values: dict[str, Any] = {}
    for (name, (allowed, source)) in zip(("steps", "guidance_scale"), ranges, strict=True):
        if name in sent:
            value = getattr(request, name)
            whose = source or f"model {model.id}"
            if value < allowed.min:
                errors.append(FieldError((name,), f"Input should be greater than or equal to {allowed.min} "
                                         f"({whose} takes {allowed.min}-{allowed.max})", value))
            elif value > allowed.max:
                errors.append(FieldError((name,), f"Input should be less than or equal to {allowed.max} "
                                         f"({whose} takes {allowed.min}-{allowed.max})", value))
        else:
            value = allowed.default
            if source:
                defaults_from.append((name, source))
        values[name] = value
    scheduler = request.scheduler
    if scheduler is None:
        needing = next((spec for spec in loras if spec.needs and spec.needs.scheduler), None)
        if needing is not None and needing.needs is not None:
            scheduler = needing.needs.scheduler
            defaults_from.append(("scheduler", f"LoRA {needing.id}"))
    return Sampling(int(values["steps"]), float(values["guidance_scale"]), scheduler, tuple(defaults_from))


def _controlnet_choices(
    units: list[ControlNetUnit],
    model: ModelSpec | None,
    registry: Registry,
    settings: Settings,
    errors: list[FieldError],
) -> tuple[ControlNetChoice, ...]:
    """The request's ControlNet units checked against the registry and the job's model (their images are
    checked with the others); problems are added to ``errors`` with their field."""
    if len(units) > settings.max_controlnets:
        errors.append(FieldError(
            ("controlnets",), f"at most {settings.max_controlnets} ControlNets per request on this server "
            f"(IMAGEN_MAX_CONTROLNETS), not {len(units)}", [unit.model for unit in units],
        ))
    fitting = registry.controlnets_for(model) if model is not None else registry.controlnets
    fitting_ids = ", ".join(c.id for c in fitting) or "none"
    choices = []
    for index, unit in enumerate(units):
        spec = registry.controlnet(unit.model)
        if spec is None:
            available = ", ".join(registry.controlnet_ids) or "none (no ControlNet is configured on this server)"
            errors.append(FieldError(
                ("controlnets", index, "model"), f"unknown ControlNet {unit.model!r}; available: {available}",
                unit.model,
            ))
        elif model is not None and spec.base != model.base:
            errors.append(FieldError(
                ("controlnets", index, "model"), f"ControlNet {spec.id!r} (for {spec.base} models) does not fit "
                f"model {model.id!r} ({model.base}); the ControlNets that fit it: {fitting_ids}", unit.model,
            ))
        elif spec.control_types is not None and unit.control_type not in spec.control_types:
            errors.append(FieldError(
                ("controlnets", index, "control_type"), f"ControlNet {spec.id!r} is a ControlNet Union: "
                f"control_type must be one of {', '.join(spec.control_types)}", unit.control_type,
            ))
        elif spec.control_types is None and unit.control_type is not None:
            errors.append(FieldError(
                ("controlnets", index, "control_type"), f"ControlNet {spec.id!r} has one control type: "
                "control_type is for ControlNet Union models only; leave it out", unit.control_type,
            ))
        if unit.start >= unit.end:
            errors.append(FieldError(
                ("controlnets", index, "start"), f"start ({unit.start}) must be before end ({unit.end})", unit.start
            ))
        if unit.preprocessor not in PREPROCESSORS:
            errors.append(FieldError(
                ("controlnets", index, "preprocessor"), f"unknown preprocessor {unit.preprocessor!r}; available "
                f"here: {', '.join(PREPROCESSORS)} (preprocessors that need weights, such as depth, pose or "
                "line art, are not installed on this server)", unit.preprocessor,
            ))
        if unit.low_threshold > unit.high_threshold:
            errors.append(FieldError(
                ("controlnets", index, "low_threshold"), f"low_threshold ({unit.low_threshold}) must not be above "
                f"high_threshold ({unit.high_threshold})", unit.low_threshold,
            ))
        choices.append(ControlNetChoice(
            model=unit.model, scale=unit.scale, start=unit.start, end=unit.end, preprocessor=unit.preprocessor,
            resize_mode=unit.resize_mode, control_type=unit.control_type, low_threshold=unit.low_threshold,
            high_threshold=unit.high_threshold, processor_res=unit.processor_res,
        ))
    kinds = [spec.is_union for unit in units if (spec := registry.controlnet(unit.model)) is not None]
    if len(set(kinds)) > 1:
        errors.append(FieldError(
            ("controlnets",), "ControlNet Union models and plain ControlNets cannot guide one job together "
            "(diffusers runs them in different pipelines)", [unit.model for unit in units],
        ))
    return tuple(choices)


def _sdxl_option_errors(request: GenerationRequest) -> list[FieldError]:
    errors = []
    if (request.width is None) != (request.height is None):
        missing = "height" if request.height is None else "width"
        errors.append(FieldError((missing,), "width and height go together: give both, or neither", None))
    elif request.width is not None and request.height is not None:
        problem = size_problem(request.width, request.height)
        if problem is not None:
            errors.append(FieldError(("width",), problem, request.width))
    available = available_samplers()
    if request.scheduler is not None and request.scheduler not in available:
        errors.append(FieldError(
            ("scheduler",), f"unknown sampler {request.scheduler!r}; available: {', '.join(available)}",
            request.scheduler,
        ))
    if request.init_image is None:
        if request.mask_image is not None:
            errors.append(FieldError(("mask_image",), "mask_image needs init_image (the image to repaint)", "…"))
        if request.strength is not None:
            errors.append(
                FieldError(("strength",), "strength needs init_image (img2img or inpainting)", request.strength)
            )
    if request.ip_image is not None and request.ip_strength <= 0:
        errors.append(FieldError(("ip_image",), "ip_image is used only with ip_strength > 0", "…"))
    return errors


class _RequestImages:
    """The request's images, checked and normalised (PNG bytes by role), and the job's size; problems are
    added to ``errors`` with their field."""

    def __init__(
        self, request: GenerationRequest, key_name: str, uploads: UploadLookup, errors: list[FieldError]
    ) -> None:
        self.pngs: dict[str, bytes] = {}
        self.init: CheckedImage | None = None
        self.size: tuple[int, int] | None = (
            (request.width, request.height) if request.width is not None and request.height is not None else None
        )
        self._errors = errors
        self._key_name = key_name
        self._uploads = uploads
        init = self._load(("init_image",), request.init_image)
        mask = self._load(("mask_image",), request.mask_image)
        ip = self._load(("ip_image",), request.ip_image)
        if ip is not None:
            self.pngs["ip"] = to_png(flatten(ip.image))
        for index, unit in enumerate(request.controlnets):
            control = self._load(("controlnets", index, "image"), unit.image)
            if control is not None:
                self.pngs[control_role(index)] = to_png(flatten(control.image))
        if init is None:
            return
        self.init = init
        if mask is not None and mask.image.size != init.image.size:
            errors.append(FieldError(
                ("mask_image",), f"mask_image is {mask.width}×{mask.height} but init_image is "
                f"{init.width}×{init.height}: they must be the same size", "…",
            ))
            return
        mask_image = mask_from(mask) if mask is not None else (mask_from_alpha(init) if init.has_alpha else None)
        if self.size is None:
            self.size = size_from_image(init.width, init.height)
        picture = flatten(init.image)
        if picture.size != self.size:
            picture = picture.resize(self.size, Image.Resampling.LANCZOS)
            if mask_image is not None:
                mask_image = mask_image.resize(self.size, Image.Resampling.NEAREST)
        self.pngs["init"] = to_png(picture)
        if mask_image is not None:
            self.pngs["mask"] = to_png(mask_image)

    def _load(self, loc: tuple[str | int, ...], value: str | None) -> CheckedImage | None:
        if value is None:
            return None
        try:
            return load_image(value, self._key_name, self._uploads)
        except BadImage as exc:
            self._errors.append(FieldError(loc, str(exc), value[:64] + ("…" if len(value) > 64 else "")))
            return None


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
