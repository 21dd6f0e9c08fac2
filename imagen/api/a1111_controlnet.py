"""AUTOMATIC1111's ControlNet extension (Mikubill/sd-webui-controlnet), as its clients call it: the units of
``alwayson_scripts.controlnet.args`` on txt2img and img2img, turned into ``POST /generate``'s ``controlnets``,
and the extension's own routes, ``GET /controlnet/model_list``, ``GET /controlnet/module_list`` and
``POST /controlnet/detect``.

A unit's fields, with the extension's names and aliases: ``enabled``, ``module``, ``model``, ``weight``,
``image`` / ``input_image`` (base64, bare or a data URL, or ``{"image": ..., "mask": ...}``), ``resize_mode``
(its names or their index 0-2), ``processor_res``, ``threshold_a`` / ``threshold_b`` (canny's thresholds),
``guidance_start``, ``guidance_end``, ``pixel_perfect``, and a Union's ``control_type``. A field whose value
would change the picture and that this server cannot honour (a unit's ``mask``, ``control_mode`` other than
Balanced, ``guessmode``, ``low_vram``, an ``hr_option`` other than Both, a field the extension does not
have) is a 422 that names it: never dropped. Another script of ``alwayson_scripts`` is a 422 too, unless
its args say it is off (``[]`` or ``[false]``, which webuiapi sends for extensions it found).
"""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.concurrency import run_in_threadpool

from imagen.api.deps import CallerDep, RegistryDep
from imagen.api.json_body import BadJson, read_json
from imagen.api.schemas import IntegerNotText
from imagen.inputs.control_maps import (
    A1111_RESIZE_MODES,
    DEFAULT_HIGH_THRESHOLD,
    DEFAULT_LOW_THRESHOLD,
    PREPROCESSORS,
    detect,
)
from imagen.inputs.images import BadImage, check_image, decode_data_url

router = APIRouter(prefix="/controlnet", tags=["AUTOMATIC1111 compatible"])

SCRIPT_NAMES = ("controlnet", "ControlNet")  # as clients send it (webuiapi: "ControlNet")
MAX_DETECT_IMAGES = 4
DEFAULT_PROCESSOR_RES = 512  # the extension's, when a unit sends -1
# The extension's older names for its resize modes, which some clients still send.
_OLD_RESIZE_NAMES = {"Envelope (Outer Fit)": "fill", "Scale to Fit (Inner Fit)": "crop"}
# A1111's ControlNet field names for ours, to name a refused field as the client wrote it.
UNIT_FIELD_NAMES = {
    "model": "model", "image": "image", "scale": "weight", "start": "guidance_start", "end": "guidance_end",
    "preprocessor": "module", "resize_mode": "resize_mode", "low_threshold": "threshold_a",
    "high_threshold": "threshold_b", "processor_res": "processor_res", "control_type": "control_type",
}  # fmt: skip
_WHY_NOT: dict[str, str] = {
    "low_vram": "memory placement is this server's own (IMAGEN_CPU_OFFLOAD); send false",
    "control_mode": 'only "Balanced" (0) is available here',
    "guessmode": "guess mode is not available here",
    "hr_option": 'only "Both" is available here (there is no hires pass)',
    "mask": "a ControlNet unit's own mask is not available here",
    "mask_image": "a ControlNet unit's own mask is not available here",
    "image": "a base64 image (bare or a data URL), or {\"image\": ...} without a mask",
    "module": f"available here: {', '.join(PREPROCESSORS)} (preprocessors that need weights are not installed)",
    "resize_mode": "one of Just Resize, Crop and Resize, Resize and Fill (or 0-2)",
}
_Fraction = Annotated[float, Field(ge=0, le=1, strict=True, allow_inf_nan=False)]
_Threshold = Literal[-1] | Annotated[int, Field(ge=1, le=255), IntegerNotText]


class OldImage(BaseModel):
    """The extension's older image form."""

    model_config = ConfigDict(extra="forbid")

    image: str
    mask: Literal[""] | None = None


class A1111Unit(BaseModel):
    """One unit as the ControlNet extension's API takes it: every field it has that means something here, and
    those that change nothing at the values allowed (a unit that is off is checked too)."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = True
    module: Literal["none", "canny", "None"] = "none"
    model: str = Field("None", description="A ControlNet id (GET /controlnet/model_list); `name [hash]` too.")
    weight: Annotated[float, Field(ge=0, le=2, strict=True, allow_inf_nan=False)] = 1.0
    image: str | OldImage | None = None
    input_image: str | None = None
    mask: Literal[""] | None = None
    mask_image: Literal[""] | None = None
    resize_mode: (
        Literal["Just Resize", "Crop and Resize", "Resize and Fill", "Envelope (Outer Fit)",
                "Scale to Fit (Inner Fit)", "crop", "fill", "stretch"]
        | Annotated[int, Field(ge=0, le=2), IntegerNotText]
    ) = "Crop and Resize"  # fmt: skip
    processor_res: Literal[-1] | Annotated[int, Field(ge=64, le=2048), IntegerNotText] = -1
    threshold_a: _Threshold = -1
    threshold_b: _Threshold = -1
    guidance_start: _Fraction = 0.0
    guidance_end: _Fraction = 1.0
    pixel_perfect: StrictBool = False
    control_type: str | None = None
    union_control_type: str | None = None
    # the extension's fields that change nothing here at these values
    low_vram: Literal[False] | None = None
    control_mode: Literal[0, "Balanced"] | None = None
    guessmode: Literal[False] | None = None
    hr_option: Literal["Both"] | None = None
    save_detected_map: StrictBool | None = None
    is_ui: Literal[False] | None = None
    loopback: Literal[False] | None = None


def client_field(loc: tuple[str | int, ...], unit_paths: list[str]) -> str | None:
    """A refused ``controlnets`` field (``("controlnets", 1, "scale")``) as the client wrote it
    (``alwayson_scripts.ControlNet.args.1.weight``); None for another field."""
    if not loc or loc[0] != "controlnets":
        return None
    if len(loc) < 2 or not isinstance(loc[1], int) or loc[1] >= len(unit_paths):
        return "alwayson_scripts.controlnet.args"
    field = UNIT_FIELD_NAMES.get(str(loc[2]), str(loc[2])) if len(loc) > 2 else None
    return unit_paths[loc[1]] + (f".{field}" if field else "")


class UnitProblem(ValueError):
    """A unit the server cannot honour; its message starts with the field, as the client named it."""


def _inlined(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with each ``$ref`` to its ``$defs`` replaced by the definition: the unit's schema is written into
    the txt2img/img2img bodies' as it is, where no ``$defs`` of its own can be resolved."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inlined(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {key: _inlined(value, defs) for key, value in schema.items() if key != "$defs"}
    if isinstance(schema, list):
        return [_inlined(item, defs) for item in schema]
    return schema


_UNIT_JSON_SCHEMA = A1111Unit.model_json_schema()
_UNIT_SCHEMA = _inlined(_UNIT_JSON_SCHEMA, _UNIT_JSON_SCHEMA.get("$defs", {}))
ALWAYSON_SCRIPTS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "description": "`controlnet` (or `ControlNet`): the ControlNet extension's units (docs/controlnet.md). "
            "Any other script only when off: its `args` `[]` or `[false]`.",
            "properties": {
                name: {"type": "object", "required": ["args"],
                       "properties": {"args": {"type": "array", "items": _UNIT_SCHEMA}}}
                for name in SCRIPT_NAMES
            },
            "additionalProperties": {
                "type": "object", "required": ["args"],
                "properties": {"args": {"type": "array", "items": {"enum": [False, None]}}},
            },
        },
        {"type": "null"},
    ]
}  # fmt: skip


def script_off(script: Any) -> bool:
    """Whether another extension's ``alwayson_scripts`` entry asks for nothing (webuiapi sends ``{"args":
    [false]}`` or ``[]`` for an extension it found on a server and does not use)."""
    args = script.get("args") if isinstance(script, dict) else None
    return isinstance(args, list) and all(arg is False or arg is None for arg in args)


def controlnet_units(scripts: Any, init_image: str | None) -> list[tuple[str, dict[str, Any]]]:
    """``alwayson_scripts`` as ``POST /generate``'s ``controlnets`` (the units that are enabled), each with
    where the client wrote it (``alwayson_scripts.ControlNet.args.1``). In img2img a unit without an image
    takes the init image, as the extension does. Raises :class:`UnitProblem`."""
    if scripts is None:
        return []
    if not isinstance(scripts, dict):
        raise UnitProblem("alwayson_scripts: must be an object of scripts, each with its `args`")
    units: list[tuple[str, dict[str, Any]]] = []
    for name, script in scripts.items():
        if name not in SCRIPT_NAMES:
            if not script_off(script):
                raise UnitProblem(f"alwayson_scripts.{name}: this server has no such script (it has: ControlNet)")
            continue
        args = script.get("args") if isinstance(script, dict) else None
        if not isinstance(args, list):
            raise UnitProblem(f"alwayson_scripts.{name}.args: must be a list of ControlNet units")
        for index, unit in enumerate(args):
            where = f"alwayson_scripts.{name}.args.{index}"
            if not isinstance(unit, dict):
                raise UnitProblem(f"{where}: each ControlNet unit must be an object (the extension's API form)")
            try:
                checked = A1111Unit.model_validate(unit)  # a unit that is off too: its fields, or a 422
            except ValidationError as exc:
                raise UnitProblem(_unit_problem(exc, where)) from None
            if checked.enabled:
                units.append((where, _unit(checked, where, init_image)))
    return units


def _unit_problem(exc: ValidationError, where: str) -> str:
    error = exc.errors()[0]
    # pydantic names a union's branch in the location (``literal['Just Resize',...]``, ``int``): not a field
    field = ".".join(str(part) for part in error["loc"] if "[" not in str(part) and str(part) not in ("int", "str"))
    if error["type"] == "extra_forbidden":
        return f"{where}.{field}: the ControlNet extension's field {field!r} is not available here"
    name = str(error["loc"][0]) if error["loc"] else ""
    why = _WHY_NOT.get(name, error["msg"])
    return f"{where}.{field}: {why} (got {error['input']!r})"


def _unit(unit: A1111Unit, where: str, init_image: str | None) -> dict[str, Any]:
    image = _image(unit.image if unit.image is not None else unit.input_image)
    if image is None:
        if init_image is None:
            raise UnitProblem(f"{where}.image: a ControlNet unit needs its control image (base64)")
        image = init_image
    if unit.model in ("", "None"):
        raise UnitProblem(f"{where}.model: name a ControlNet (GET /controlnet/model_list)")
    native: dict[str, Any] = {
        "model": unit.model.split(" [", 1)[0].strip(),  # A1111 lists "name [hash]"
        "image": image,
        "preprocessor": unit.module.lower(),
        "scale": unit.weight,
        "start": unit.guidance_start,
        "end": unit.guidance_end,
        "resize_mode": _resize_mode(unit.resize_mode),
    }
    control_type = unit.control_type if unit.control_type is not None else unit.union_control_type
    if control_type not in (None, "", "All"):
        native["control_type"] = str(control_type).lower()
    if not unit.pixel_perfect:
        native["processor_res"] = DEFAULT_PROCESSOR_RES if unit.processor_res == -1 else unit.processor_res
    if native["preprocessor"] == "canny":
        native["low_threshold"] = DEFAULT_LOW_THRESHOLD if unit.threshold_a == -1 else unit.threshold_a
        native["high_threshold"] = DEFAULT_HIGH_THRESHOLD if unit.threshold_b == -1 else unit.threshold_b
    return native


def _image(value: str | OldImage | None) -> str | None:
    if isinstance(value, OldImage):  # the extension's older {"image": ..., "mask": ...} form
        value = value.image
    if not value:
        return None
    return value if value.startswith("data:") else "data:image/png;base64," + value


def _resize_mode(value: str | int) -> str:
    if isinstance(value, int):
        return A1111_RESIZE_MODES[list(A1111_RESIZE_MODES)[value]]
    return A1111_RESIZE_MODES.get(value) or _OLD_RESIZE_NAMES.get(value) or value


def _whole(value: Any) -> Any:
    """A whole number as an int (JSON's 64.0 is the integer 64, and the extension's sliders send floats);
    anything else as it came, for the check that refuses it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _threshold(value: Any, default: int) -> Any:
    if value is None or value == -1:
        return default
    return _whole(value)


# --- the extension's routes -----------------------------------------------------------------------------
@router.get("/model_list")
def model_list(registry: RegistryDep, caller: CallerDep) -> dict[str, Any]:
    """The registry's ControlNets, by id (a unit's `model`)."""
    return {"model_list": registry.controlnet_ids}


@router.get("/module_list")
def module_list(caller: CallerDep) -> dict[str, Any]:
    """The preprocessors (a unit's `module`): those that need no weights."""
    return {"module_list": list(PREPROCESSORS), "module_detail": {}}


def _error(detail: str) -> JSONResponse:
    return JSONResponse({"error": "ValidationError", "detail": detail, "body": "", "errors": ""}, status_code=422)


_THRESHOLD = {"anyOf": [{"const": -1}, {"type": "integer", "minimum": 1, "maximum": 255}]}
_DETECT_BODY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["controlnet_input_images"],
    "properties": {
        "controlnet_module": {"type": "string", "enum": list(PREPROCESSORS), "default": "none"},
        "controlnet_input_images": {
            "type": "array", "minItems": 1, "maxItems": MAX_DETECT_IMAGES, "items": {"type": "string"},
            "description": "Base64 images (bare or data URLs); webuiapi sends them as `controlnet_images`.",
        },
        "controlnet_processor_res": {
            "anyOf": [{"const": -1}, {"type": "integer", "minimum": 64, "maximum": 2048}], "default": 512,
            "description": "The image's short side when detecting; -1: its own size.",
        },
        "controlnet_threshold_a": {**_THRESHOLD, "description": "Canny's low threshold (-1: 100)."},
        "controlnet_threshold_b": {**_THRESHOLD, "description": "Canny's high threshold (-1: 200)."},
    },
}  # fmt: skip
_DETECT_KEYS = {*_DETECT_BODY["properties"], "controlnet_images"}  # type: ignore[misc]
_DETECT_ANSWER = {
    "type": "object",
    "required": ["images", "info"],
    "properties": {"images": {"type": "array", "items": {"type": "string"}}, "info": {"type": "string"}},
}
_ERROR = {
    "type": "object",
    "required": ["error", "detail", "body", "errors"],
    "properties": {name: {"type": "string"} for name in ("error", "detail", "body", "errors")},
}


@router.post(
    "/detect",
    response_model=None,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _DETECT_BODY}}}},
    responses={
        200: {"description": "The maps, base64 PNGs.", "content": {"application/json": {"schema": _DETECT_ANSWER}}},
        422: {
            "description": "A refused request: `detail` names the field.",
            "content": {"application/json": {"schema": _ERROR}},
        },
    },
)
async def detect_maps(http: Request, caller: CallerDep) -> JSONResponse:
    """The control maps a preprocessor makes of up to four images: `{"images": [base64 PNG], "info"}`."""
    try:
        body = await read_json(http, empty=b"{}")
    except BadJson as exc:
        return _error(str(exc))
    if not isinstance(body, dict):
        return _error("the body must be a JSON object")
    unknown = sorted(set(body) - _DETECT_KEYS)
    if unknown:
        fields = ", ".join(sorted(_DETECT_KEYS))
        return _error(f"{unknown[0]}: not a field of /controlnet/detect here (its fields: {fields})")
    module = body.get("controlnet_module", "none")
    if not isinstance(module, str) or module not in PREPROCESSORS:
        return _error(f"controlnet_module: {module!r} is not available here; available: {', '.join(PREPROCESSORS)}")
    images = body.get("controlnet_input_images", body.get("controlnet_images"))
    if not isinstance(images, list) or not 1 <= len(images) <= MAX_DETECT_IMAGES:
        return _error(f"controlnet_input_images: a list of 1 to {MAX_DETECT_IMAGES} base64 images")
    res = _whole(body.get("controlnet_processor_res", DEFAULT_PROCESSOR_RES))
    low = _threshold(body.get("controlnet_threshold_a"), DEFAULT_LOW_THRESHOLD)
    high = _threshold(body.get("controlnet_threshold_b"), DEFAULT_HIGH_THRESHOLD)
    problem = _detect_problem(res, low, high)
    if problem is not None:
        return _error(problem)
    try:
        # decoding, edge detection and encoding are CPU work: never on the event loop
        maps = await run_in_threadpool(_detect_all, images, module, low, high, None if res == -1 else res)
    except BadImage as exc:
        return _error(f"controlnet_input_images: {exc}")
    return JSONResponse({"images": maps, "info": "Success"})


def _detect_problem(res: Any, low: Any, high: Any) -> str | None:
    if not isinstance(res, int) or isinstance(res, bool) or not (res == -1 or 64 <= res <= 2048):
        return "controlnet_processor_res: an integer from 64 to 2048 (or -1: the image's own size)"
    for name, value in (("controlnet_threshold_a", low), ("controlnet_threshold_b", high)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255:
            return f"{name}: canny's threshold, an integer from 1 to 255"
    return None


def _detect_all(images: list[Any], module: str, low: int, high: int, res: int | None) -> list[str]:
    out = []
    for index, value in enumerate(images):
        if not isinstance(value, str):
            raise BadImage(f"image {index} is not a base64 string")
        data_url = value if value.startswith("data:") else "data:image/png;base64," + value
        checked = check_image(decode_data_url(data_url))
        detected = detect(checked.image, module, low, high, res)
        buffer = io.BytesIO()
        detected.save(buffer, format="PNG", compress_level=1)
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out
