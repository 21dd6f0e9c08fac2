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
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from imagen.api.deps import CallerDep, RegistryDep
from imagen.api.json_body import BadJson, read_json
from imagen.inputs.control_maps import (
    A1111_RESIZE_MODES,
    DEFAULT_HIGH_THRESHOLD,
    DEFAULT_LOW_THRESHOLD,
    PREPROCESSORS,
    RESIZE_MODES,
    detect,
)
from imagen.inputs.images import BadImage, check_image, decode_data_url

router = APIRouter(prefix="/controlnet", tags=["AUTOMATIC1111 compatible"])

SCRIPT_NAME = "controlnet"  # matched without regard to case: clients send "controlnet" and "ControlNet"
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
# Fields a unit may carry at a value that changes nothing here (the extension's UI and saving options).
_NO_EFFECT: dict[str, tuple[Any, ...]] = {
    "low_vram": (False, None),
    "control_mode": (0, "Balanced", None),
    "guessmode": (None, False),
    "hr_option": ("Both", None),
    "save_detected_map": (True, False, None),
    "is_ui": (False, None),
    "loopback": (False, None),
    "mask": (None, ""),
    "mask_image": (None, ""),
}
_READ = {
    "enabled", "module", "model", "weight", "image", "input_image", "resize_mode", "processor_res", "threshold_a",
    "threshold_b", "guidance_start", "guidance_end", "pixel_perfect", "control_type", "union_control_type",
}  # fmt: skip
_WHY_NOT: dict[str, str] = {
    "low_vram": "memory placement is this server's own (IMAGEN_CPU_OFFLOAD); send false",
    "control_mode": 'only "Balanced" (0) is available here',
    "guessmode": "guess mode is not available here",
    "hr_option": 'only "Both" is available here (there is no hires pass)',
    "mask": "a ControlNet unit's own mask is not available here",
    "mask_image": "a ControlNet unit's own mask is not available here",
}


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
        if name.lower() != SCRIPT_NAME:
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
            if unit.get("enabled", True) is False:
                continue
            units.append((where, _unit(unit, where, init_image)))
    return units


def _unit(unit: dict[str, Any], where: str, init_image: str | None) -> dict[str, Any]:
    for key, value in unit.items():
        if key in _READ:
            continue
        if key in _NO_EFFECT:
            if value not in _NO_EFFECT[key]:
                raise UnitProblem(f"{where}.{key}: {_WHY_NOT.get(key, 'not available here')} (got {value!r})")
            continue
        raise UnitProblem(f"{where}.{key}: the ControlNet extension's field {key!r} is not available here")
    image = _image(unit.get("image", unit.get("input_image")), where)
    if image is None:
        if init_image is None:
            raise UnitProblem(f"{where}.image: a ControlNet unit needs its control image (base64)")
        image = init_image
    model = unit.get("model")
    if not isinstance(model, str) or model in ("", "None"):
        raise UnitProblem(f"{where}.model: name a ControlNet (GET /controlnet/model_list)")
    module = unit.get("module", "none")
    module = "none" if module in (None, "None") else module
    native: dict[str, Any] = {
        "model": model.split(" [", 1)[0].strip(),  # A1111 lists "name [hash]"
        "image": image,
        "preprocessor": module.lower() if isinstance(module, str) else module,
    }
    if "weight" in unit:
        native["scale"] = unit["weight"]
    if "guidance_start" in unit:
        native["start"] = unit["guidance_start"]
    if "guidance_end" in unit:
        native["end"] = unit["guidance_end"]
    if "resize_mode" in unit:
        native["resize_mode"] = _resize_mode(unit["resize_mode"], where)
    control_type = unit.get("control_type", unit.get("union_control_type"))
    if control_type not in (None, "", "All"):
        native["control_type"] = control_type.lower() if isinstance(control_type, str) else control_type
    if not unit.get("pixel_perfect", False):
        res = unit.get("processor_res", -1)
        native["processor_res"] = DEFAULT_PROCESSOR_RES if res in (None, -1) else res
    if native["preprocessor"] == "canny":
        native["low_threshold"] = _threshold(unit.get("threshold_a"), DEFAULT_LOW_THRESHOLD)
        native["high_threshold"] = _threshold(unit.get("threshold_b"), DEFAULT_HIGH_THRESHOLD)
    return native


def _image(value: Any, where: str) -> str | None:
    if isinstance(value, dict):  # the extension's older {"image": ..., "mask": ...} form
        if value.get("mask"):
            raise UnitProblem(f"{where}.image.mask: {_WHY_NOT['mask']}")
        value = value.get("image")
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise UnitProblem(f"{where}.image: must be a base64 image (bare or a data URL)")
    return value if value.startswith("data:") else "data:image/png;base64," + value


def _resize_mode(value: Any, where: str) -> str:
    names = list(A1111_RESIZE_MODES)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return A1111_RESIZE_MODES[names[value]]
    if isinstance(value, str):
        if value in A1111_RESIZE_MODES:
            return A1111_RESIZE_MODES[value]
        if value in _OLD_RESIZE_NAMES:
            return _OLD_RESIZE_NAMES[value]
        if value in RESIZE_MODES:
            return value
    raise UnitProblem(f"{where}.resize_mode: one of {', '.join(names)} (or 0-2), not {value!r}")


def _threshold(value: Any, default: int) -> Any:
    if value is None or value == -1:
        return default
    # the extension's sliders send floats (64.0); a whole number is the threshold, anything else is refused
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


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


@router.post("/detect", response_model=None)
async def detect_maps(http: Request, caller: CallerDep) -> JSONResponse:
    """The control maps a preprocessor makes of up to four images: `{"images": [base64 PNG], "info"}`."""
    try:
        body = await read_json(http, empty=b"{}")
    except BadJson as exc:
        return _error(str(exc))
    if not isinstance(body, dict):
        return _error("the body must be a JSON object")
    module = body.get("controlnet_module", "none")
    if module not in PREPROCESSORS:
        return _error(f"controlnet_module: {module!r} is not available here; available: {', '.join(PREPROCESSORS)}")
    images = body.get("controlnet_input_images", body.get("controlnet_images"))
    if not isinstance(images, list) or not 1 <= len(images) <= MAX_DETECT_IMAGES:
        return _error(f"controlnet_input_images: a list of 1 to {MAX_DETECT_IMAGES} base64 images")
    res = body.get("controlnet_processor_res", DEFAULT_PROCESSOR_RES)
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
