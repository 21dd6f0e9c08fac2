"""Images that come in with requests (img2img, inpainting, IP-Adapter references): checked once, at the door.

An image arrives as a base64 ``data:`` URL in the JSON, or as an upload (``POST /uploads``) that a request
names ``"upload:<id>"``. Either way it is checked here, before any job exists, so a bad image is a 422 that
says what is wrong and never a job that fails later:

- PNG, JPEG or WebP, recognised by content (never by name or declared type);
- at most ``MAX_IMAGE_BYTES`` bytes and ``MAX_IMAGE_PIXELS`` pixels: the size is read from the header and
  refused before the pixels are decoded (a 1 KB PNG that claims 100,000² is never decoded);
- decodable to the end (a truncated file is refused);
- EXIF orientation applied (a phone photo comes out upright; damaged EXIF is ignored);
- a PNG whose compressed metadata (zTXt, iTXt, iCCP) expands past Pillow's limits is refused;
- a CMYK JPEG is converted to RGB.

What a job receives (``prepare``) is a normalised PNG per role: ``init`` and ``ip`` in RGB, ``mask`` in L
(white = repaint). An ``init`` image with transparency and no ``mask`` gives its mask from the alpha
channel (transparent = repaint, AUTOMATIC1111's convention), then is flattened on white (A1111's default
background); a ``mask`` with alpha is read from its alpha channel the same way.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded size; an SDXL job uses at most 2048² (larger ones are resized)
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})  # modes a PNG holds as they are
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*);base64,(?P<data>.*)", re.S)


class BadImage(ValueError):
    """Why an image is refused, as a sentence for the 422."""


@dataclass(frozen=True)
class CheckedImage:
    """A decoded, upright image and what it was."""

    image: Image.Image
    format: str  # PNG | JPEG | WEBP

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def has_alpha(self) -> bool:
        return self.image.mode in ("RGBA", "LA", "PA") or (
            self.image.mode == "P" and "transparency" in self.image.info
        )


def decode_data_url(text: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL."""
    match = _DATA_URL.fullmatch(text.strip())
    if match is None:
        raise BadImage('expected a data URL ("data:image/png;base64,...") or "upload:<id>" from POST /uploads')
    payload = re.sub(r"\s+", "", match["data"])
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise BadImage(f"image larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("the data URL's base64 is not valid") from None


def check_image(data: bytes) -> CheckedImage:
    """Decode ``data`` if it is an acceptable image, else raise ``BadImage`` saying why."""
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"image larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB ({len(data)} bytes)")
    if not data:
        raise BadImage("empty file, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on damaged EXIF: the pixels count
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(
            f"the image claims far more pixels than the {MAX_IMAGE_PIXELS:,} accepted (e.g. 4096×4096); "
            "refused without decoding it"
        ) from None
    except (UnidentifiedImageError, OSError):
        raise BadImage("not a PNG, JPEG or WebP image") from None
    except (ValueError, SyntaxError) as exc:  # Pillow reads a PNG's chunks up to the pixels here
        raise _unreadable(exc) from None
    width, height = opened.size  # from the header: nothing decoded yet
    if width * height > MAX_IMAGE_PIXELS or width < 1 or height < 1:
        raise BadImage(
            f"image of {width}×{height} pixels: at most {MAX_IMAGE_PIXELS:,} pixels (e.g. 4096×4096) are accepted"
        )
    try:
        opened.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise _unreadable(exc) from None
    try:
        upright = ImageOps.exif_transpose(opened) or opened
    except Exception:  # damaged EXIF (SyntaxError, ValueError, struct.error...): kept as stored
        upright = opened
    if upright.mode not in _PNG_MODES:  # a CMYK JPEG: every role's PNG (and the engine) needs RGB
        upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
    return CheckedImage(image=upright, format=str(opened.format))


def _unreadable(exc: Exception) -> BadImage:
    """Why Pillow could not read an image that announced a known format and an accepted size."""
    if any(sign in str(exc).lower() for sign in ("too large", "too much memory")):
        chunk, total = PngImagePlugin.MAX_TEXT_CHUNK // 2**20, PngImagePlugin.MAX_TEXT_MEMORY // 2**20
        return BadImage(
            f"a compressed metadata chunk (PNG zTXt, iTXt or iCCP) expands to more than {chunk} MB ({total} MB in "
            "all): refused"
        )
    return BadImage("the image is truncated or damaged: it cannot be decoded to the end")


def to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _alpha(image: Image.Image) -> Image.Image:
    return image.convert("RGBA").getchannel("A")


def flatten(image: Image.Image) -> Image.Image:
    """RGB, any transparency composited on white."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def mask_from(checked: CheckedImage) -> Image.Image:
    """A mask image as L, white = repaint: from its alpha channel when it has one (transparent = repaint),
    else from its grey levels."""
    if checked.has_alpha:
        return _alpha(checked.image).point(lambda a: 255 if a < 128 else 0)
    return checked.image.convert("L")


def mask_from_alpha(checked: CheckedImage) -> Image.Image:
    """The mask an init image's transparency gives (transparent = repaint)."""
    return _alpha(checked.image).point(lambda a: 255 if a < 128 else 0)
