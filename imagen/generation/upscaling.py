"""Upscaler models: single-image super-resolution networks (ESRGAN, Real-ESRGAN, SwinIR, HAT, ...) loaded
with spandrel, as ComfyUI does, and run tile by tile so that a 4x upscale of a 2048x2048 picture fits.

* :func:`load_upscaler` reads a ``.safetensors`` file (never a pickle: ``.pt``/``.pth``/``.ckpt`` can run
  code on load) and accepts only what spandrel describes as a super-resolution image model.
* :func:`upscale` runs it over overlapping tiles blended with feathered (linearly ramped) weights, so tile
  borders leave no seams, and optionally resizes the result with Lanczos to an exact size (a 4x model can
  serve a 1.5x "hires fix").
* :func:`lanczos` is the plain resize, the upscaler that needs no model.

Worker-side code: it imports torch; spandrel itself is imported on first use, by :func:`import_spandrel`.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import itertools
import logging
import math
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image

from imagen.registry import safe_files

log = logging.getLogger(__name__)

TORCHVISION_UNAVAILABLE = (
    "torchvision is unavailable: needed only by spandrel's LaMa and RestoreFormer architectures, "
    "which Imagen does not serve"
)
# The torchvision modules spandrel imports names from (LaMa: InterpolationMode, rotate; RestoreFormer: normalize).
_STAND_IN_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
_PURPOSES = {
    "FaceSR": "face restoration (FaceSR)",
    "Restoration": "image restoration at 1x (denoising, deblurring, JPEG artefacts)",
    "Inpainting": "inpainting (it takes an image and a mask)",
}
_import_lock = threading.Lock()


class UpscaleCancelled(Exception):
    """``upscale``'s ``stop()`` returned True between two tiles: the upscale was abandoned."""


@dataclass(frozen=True)
class UpscalerModel:
    """A loaded super-resolution model and what :func:`upscale` needs to know about it.

    ``descriptor`` is spandrel's ``ImageModelDescriptor`` (the module in eval mode, without gradients);
    ``scale`` is its fixed output factor; ``multiple_of``/``minimum`` are the input size requirements
    (spandrel pads inputs that miss them; tiles are chosen not to); ``tiling`` is spandrel's advice
    (``"supported"``, ``"discouraged"``, or ``"internal"``: the model tiles itself, so it gets the
    whole image in one piece).
    """

    descriptor: Any
    path: Path
    architecture: str
    scale: int
    supports_half: bool
    supports_bfloat16: bool
    device: torch.device
    dtype: torch.dtype
    multiple_of: int
    minimum: int
    tiling: str
    tags: tuple[str, ...]


class _Unavailable:
    """Stands for one torchvision name that spandrel imports at module level but uses only when LaMa or
    RestoreFormer runs: calling it, or reading any of its attributes (``InterpolationMode.BILINEAR``),
    raises a RuntimeError that says why. Private and dunder attributes raise AttributeError instead, so
    Python's own probing (``hasattr``, ``copy``, ``inspect``) behaves as with any object."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError(f"{TORCHVISION_UNAVAILABLE} (torchvision.{self._name} was called)")

    def __getattr__(self, attr: str) -> NoReturn:
        if attr.startswith("_"):
            raise AttributeError(attr)
        raise RuntimeError(f"{TORCHVISION_UNAVAILABLE} (torchvision.{self._name}.{attr} was used)")

    def __repr__(self) -> str:
        return f"<unavailable torchvision.{self._name}>"


def _stand_in_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"Imagen's stand-in for {name}: {TORCHVISION_UNAVAILABLE}.")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []  # a package that holds nothing else: ``import torchvision.ops`` fails as ImportError
    short = name.removeprefix("torchvision").lstrip(".")

    def missing(attr: str) -> _Unavailable:
        if attr.startswith("__"):
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        return _Unavailable(f"{short}.{attr}" if short else attr)

    module.__getattr__ = missing  # type: ignore[method-assign]  # PEP 562 module __getattr__
    return module


def import_spandrel() -> types.ModuleType:
    """Import spandrel, with a stand-in for torchvision when the real one cannot be imported.

    Why: spandrel imports torchvision when the package is imported, for two architectures only (LaMa:
    ``InterpolationMode``, ``rotate``; RestoreFormer: ``normalize``), which use those names only when such a
    model runs, and Imagen serves neither (inpainting, face restoration). torchvision is not needed for
    anything Imagen does, and the torchvision that pip installs next to a CPU-only torch can fail on import
    (``RuntimeError: operator torchvision::nms does not exist``: its compiled extension does not match
    the torch build); on a CUDA machine with a matching torchvision it imports and is used as is.

    So: try ``import torchvision``; if that raises (ImportError, RuntimeError, OSError), forget the modules
    it half-imported, put three empty stand-in modules in ``sys.modules`` (``torchvision``,
    ``torchvision.transforms``, ``torchvision.transforms.functional``) whose every name raises a clear error
    when used, import spandrel, then take the stand-ins out of ``sys.modules`` again, so that other
    libraries in the process (transformers, diffusers) see torchvision exactly as before. spandrel's LaMa and
    RestoreFormer modules keep the stand-in names they imported, and fail with that message if ever run.
    """
    with _import_lock:
        loaded = sys.modules.get("spandrel")
        if loaded is not None:
            return loaded
        try:
            importlib.import_module("torchvision")
        except (ImportError, RuntimeError, OSError) as error:
            return _import_spandrel_with_stand_in(error)
        return importlib.import_module("spandrel")


def _import_spandrel_with_stand_in(error: BaseException) -> types.ModuleType:
    # A failed import leaves behind the submodules it had finished (torchvision.extension, ...): forget them.
    # An entry that is None is a deliberate "no such module" (``sys.modules["torchvision"] = None``); it is
    # put back afterwards.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        if sys.modules[name] is not None:
            del sys.modules[name]
    log.info(
        "torchvision cannot be imported (%s: %s); spandrel is imported with a stand-in: %s",
        type(error).__name__,
        error,
        TORCHVISION_UNAVAILABLE,
    )
    stand_ins = {name: _stand_in_module(name) for name in _STAND_IN_MODULES}
    for parent, child in itertools.pairwise(_STAND_IN_MODULES):
        setattr(stand_ins[parent], child.rsplit(".", 1)[1], stand_ins[child])
    blocked = {name for name in _STAND_IN_MODULES if name in sys.modules}  # only None entries are left
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("spandrel")
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                if name in blocked:
                    sys.modules[name] = None  # type: ignore[assignment]
                else:
                    del sys.modules[name]


def load_upscaler(path: Path, device: torch.device | str, dtype: torch.dtype) -> UpscalerModel:
    """Load the super-resolution model in ``path`` (a ``.safetensors`` file) onto ``device``.

    spandrel detects the architecture and its hyperparameters from the weights' names and shapes. The model
    runs in ``dtype`` when spandrel says the architecture supports it (``supports_half`` for float16,
    ``supports_bfloat16``); otherwise in float32 (logged), since an unsupported half type gives black or NaN
    pictures for some architectures. Raises ValueError (naming the file) for anything that is not a
    safetensors file, an architecture spandrel does not know, or a model that is not a 3-channel
    super-resolution model (a denoiser, a face restorer, an inpainter).
    """
    path = Path(path)
    # Refuses .pt/.pth/.ckpt by name and a pickle renamed .safetensors by content (UnsafeFileError is a
    # ValueError); spandrel itself would unpickle those, with a restricted unpickler, but Imagen loads no pickle.
    safe_files.read_safetensors_header(path)
    spandrel = import_spandrel()
    device = torch.device(device)
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_file(path)
    except spandrel.UnsupportedModelError as error:
        raise ValueError(f"{path}: not a model architecture that spandrel {spandrel.__version__} knows") from error
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, KeyError) as error:
        # The architecture was recognised from some keys, but the weights do not fit the network spandrel
        # builds for it (missing keys, other shapes: e.g. an RRDBNet whose dense blocks do not grow by 32).
        raise ValueError(f"{path}: its weights do not fit the architecture spandrel detected: {error}") from error
    architecture = str(descriptor.architecture.name)
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        purpose = _PURPOSES.get(str(descriptor.purpose), str(descriptor.purpose))
        raise ValueError(f"{path}: this {architecture} model is for {purpose}, not a super-resolution upscaler")
    if descriptor.purpose != "SR":
        purpose = _PURPOSES.get(str(descriptor.purpose), str(descriptor.purpose))
        raise ValueError(
            f"{path}: this {architecture} model is for {purpose} (scale {descriptor.scale}x), "
            "not a super-resolution upscaler"
        )
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ValueError(
            f"{path}: this {architecture} model has {descriptor.input_channels} input and "
            f"{descriptor.output_channels} output channels; only RGB (3 in, 3 out) upscalers are supported"
        )
    supports_half = bool(descriptor.supports_half)
    supports_bfloat16 = bool(descriptor.supports_bfloat16)
    run_dtype = dtype
    if (dtype == torch.float16 and not supports_half) or (dtype == torch.bfloat16 and not supports_bfloat16):
        log.info("%s: %s does not support %s; it runs in float32", path.name, architecture, dtype)
        run_dtype = torch.float32
    descriptor.to(device=device, dtype=run_dtype)
    descriptor.eval()
    descriptor.model.requires_grad_(False)
    requirements = descriptor.size_requirements
    return UpscalerModel(
        descriptor=descriptor,
        path=path,
        architecture=architecture,
        scale=int(descriptor.scale),
        supports_half=supports_half,
        supports_bfloat16=supports_bfloat16,
        device=device,
        dtype=run_dtype,
        multiple_of=int(requirements.multiple_of),
        minimum=int(requirements.minimum),
        tiling=str(descriptor.tiling.name).lower(),
        tags=tuple(str(tag) for tag in descriptor.tags),
    )


def lanczos(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to ``target`` (width, height) with Lanczos: the upscaler that needs no model, and the
    last step of :func:`upscale` when the model's fixed scale is not the size asked for. RGB out."""
    width, height = target
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, not {width}x{height}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if rgb.size == (width, height):
        return rgb.copy() if rgb is image else rgb
    return rgb.resize((width, height), Image.Resampling.LANCZOS)


def _spans(size: int, tile: int, overlap: int, multiple: int) -> list[tuple[int, int]]:
    """The [start, end) input spans of the tiles along one axis: each at most ``tile`` long, neighbours
    overlapping by at least ``overlap``, starts on multiples of ``multiple`` (so that a model that
    pixel-unshuffles, or works on windows, sees the same pixel grid in every tile as in the whole image)."""
    if size <= tile:
        return [(0, size)]
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    starts = list(range(0, size - tile, stride))
    # The last tile ends at the border; rounding its start up keeps it on the grid and at most ``tile`` long
    # (it may then be shorter, and spandrel pads it at the image border, as it would pad the whole image).
    starts.append(math.ceil((size - tile) / multiple) * multiple)
    return [(start, min(start + tile, size)) for start in starts]


def _feather(spans: list[tuple[int, int]], index: int, ramp: int, scale: int) -> torch.Tensor:
    """One tile's blending weights along one axis, in output pixels: 1, ramping linearly down to nearly 0
    over ``ramp`` pixels at each edge that borders another tile (never at the image border)."""
    start, end = spans[index]
    weight = torch.ones((end - start) * scale, dtype=torch.float32)
    length = min(ramp, weight.numel() // 2)
    if length > 0:
        rise = (torch.arange(length, dtype=torch.float32) + 0.5) / length
        if index > 0:
            weight[:length] = rise
        if index < len(spans) - 1:
            weight[-length:] = torch.minimum(weight[-length:], rise.flip(0))
    return weight


def upscale(
    model: UpscalerModel,
    image: Image.Image,
    target: tuple[int, int] | None = None,
    tile: int = 512,
    overlap: int = 32,
    stop: Callable[[], bool] | None = None,
    on_tile: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Upscale ``image`` by ``model.scale``, tile by tile; then, if ``target`` (width, height) is given,
    resize that to exactly ``target`` with Lanczos.

    Tiles are at most ``tile`` input pixels a side (rounded down to the model's ``multiple_of``) and overlap
    by at least ``overlap`` pixels; each tile's output is weighted by a linear feather over its overlapping
    edges and the weights are normalised, so there are no seams (the network's view of a tile edge, padded,
    is its least reliable part, and it is the part that counts least). The tiles form a grid, so the summed
    weight is the product of one row and one column vector: no full-size weight buffer is kept.

    RGB out; RGBA (alpha dropped), L, P and other modes are converted to RGB first. ``stop()`` is asked
    before each tile and ``UpscaleCancelled`` raised when it returns True; ``on_tile(done, total)`` is called
    after each tile.

    Memory (host): one float32 output buffer, ``(scale*W) x (scale*H) x 3 x 4`` bytes (a 4x upscale of
    2048x2048: 8192x8192, 805 MB), the input as uint8, one tile's output at a time (a 512 tile at 4x: 50 MB),
    and at the end a uint8 copy of the output (201 MB) made before the float buffer is freed; PIL then copies
    that into its own image (4 bytes a pixel: 268 MB). The peak is the float buffer plus its uint8 copy,
    about 1.25x the float buffer: ~1.0 GB for 2048 -> 8192, plus the ``target`` resize's image if any.
    The model's activations for one tile live on ``model.device``.
    """
    if tile < 1:
        raise ValueError(f"tile must be at least 1 pixel, not {tile}")
    if overlap < 0 or 2 * overlap >= tile:
        raise ValueError(f"overlap must be at least 0 and less than half the tile ({tile}), not {overlap}")
    if target is not None and (target[0] < 1 or target[1] < 1):
        raise ValueError(f"target size must be positive, not {target[0]}x{target[1]}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    scale = model.scale
    multiple = max(1, model.multiple_of)
    if model.tiling == "internal":
        tile = max(width, height)  # the model tiles (or needs the whole picture) itself
    tile = max(tile // multiple * multiple, multiple, model.minimum)
    overlap = min(overlap, (tile - 1) // 2)
    rows = _spans(height, tile, overlap, multiple)
    columns = _spans(width, tile, overlap, multiple)
    total = len(rows) * len(columns)

    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)  # 3 x H x W, uint8
    output = torch.zeros((height * scale, width * scale, 3), dtype=torch.float32)
    row_weights = [_feather(rows, i, overlap * scale, scale) for i in range(len(rows))]
    column_weights = [_feather(columns, j, overlap * scale, scale) for j in range(len(columns))]
    done = 0
    with torch.inference_mode():
        for i, (top, bottom) in enumerate(rows):
            for j, (left, right) in enumerate(columns):
                if stop is not None and stop():
                    raise UpscaleCancelled(f"upscale stopped after {done} of {total} tiles")
                piece = pixels[:, top:bottom, left:right].to(device=model.device, dtype=torch.float32) / 255.0
                result = model.descriptor(piece.unsqueeze(0).to(model.dtype))
                expected = (1, 3, (bottom - top) * scale, (right - left) * scale)
                if tuple(result.shape) != expected:
                    raise RuntimeError(
                        f"{model.path.name}: a {tuple(piece.shape)} tile gave {tuple(result.shape)}, "
                        f"not {expected}: its scale is not {scale}"
                    )
                out = result[0].to(device="cpu", dtype=torch.float32)
                del result, piece
                out.mul_(row_weights[i].view(1, -1, 1)).mul_(column_weights[j].view(1, 1, -1))
                output[top * scale : bottom * scale, left * scale : right * scale].add_(out.permute(1, 2, 0))
                del out
                done += 1
                if on_tile is not None:
                    on_tile(done, total)
        row_sum = torch.zeros(height * scale, dtype=torch.float32)
        for (top, bottom), weight in zip(rows, row_weights, strict=True):
            row_sum[top * scale : bottom * scale] += weight
        column_sum = torch.zeros(width * scale, dtype=torch.float32)
        for (left, right), weight in zip(columns, column_weights, strict=True):
            column_sum[left * scale : right * scale] += weight
        output.div_(row_sum.view(-1, 1, 1)).div_(column_sum.view(1, -1, 1))
        output.mul_(255.0).add_(0.5).clamp_(0.0, 255.0)
        quantised = output.to(torch.uint8)
        del output
    result_image = Image.fromarray(quantised.numpy(), "RGB")
    del quantised
    if target is not None and result_image.size != tuple(target):
        return lanczos(result_image, target)
    return result_image
