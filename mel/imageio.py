"""Loading user images safely: one function, clear errors.

`load_image` accepts a path, raw bytes, a PIL image or (only with allow_url=True) an http(s)
URL, and returns an RGB PIL image with its EXIF orientation applied. Every failure a user can
cause raises InputError with a message that says what was wrong:

- a missing path, a directory, an empty file;
- bytes that are not an image, or a corrupt / truncated image;
- an image whose header announces more than MAX_PIXELS pixels (checked before decoding, so a
  huge image is refused without allocating it), or a decompression bomb;
- a URL without allow_url=True, a URL that cannot be fetched, or one larger than MAX_URL_BYTES;
- a pixel mode that has no faithful 8-bit RGB version (a float image outside 0..1 and 0..255...).

Every mode Pillow reads becomes 8-bit RGB by what its pixels mean, not by clipping: 16-bit
images are scaled by their real bit depth (65535 -> 255; a TIFF's declared BitsPerSample), alpha
(RGBA, LA, PA, P with transparency, premultiplied RGBa/La) is composited on white, CMYK, YCbCr,
LAB and HSV use Pillow's standard conversions, 1-bit, L, P and RGBX convert directly.
Code that opens an image should go through `load_image` (a PIL image too: `load_image(im)`),
not Image.open + convert("RGB"), which clips 16-bit images to white and shows the colour under
transparent pixels.
"""
from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

MAX_PIXELS = 40_000_000  # 40 megapixels; larger photos should be resized before linking
MAX_URL_BYTES = 20 * 1024 * 1024
URL_TIMEOUT_S = 15.0

ImageSource = Union[str, Path, bytes, bytearray, Image.Image]


def _is_url(source) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """GET an http(s) URL with a timeout and a byte limit; InputError on any failure."""
    if not _is_url(url):
        raise InputError(f"not an http(s) URL: {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "mel-image-loader/0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise InputError(f"image at {url} is {int(length):,} bytes, more than the limit of {max_bytes:,}")
            data = response.read(max_bytes + 1)
    except InputError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InputError(f"could not fetch image from {url}: {e}") from e
    if len(data) > max_bytes:
        raise InputError(f"image at {url} is larger than the limit of {max_bytes:,} bytes")
    return data


def _read_bytes(source, allow_url: bool) -> tuple[bytes, str]:
    """The raw bytes of a path / bytes / URL source, and a short description for messages."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), f"image bytes ({len(source):,} bytes)"
    if _is_url(source):
        if not allow_url:
            raise InputError(
                f"{source!r} is a URL; fetching images from URLs is off. "
                "Download the image and pass its path, or call with allow_url=True."
            )
        return fetch_url(source), str(source)
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if str(source).strip() == "":
            raise InputError("empty image path")
        if not path.exists():
            raise InputError(f"image file not found: {path}")
        if path.is_dir():
            raise InputError(f"{path} is a directory, not an image file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read image file {path}: {e}") from e
        return data, str(path)
    raise InputError(f"unsupported image source of type {type(source).__name__}; give a path, bytes or a PIL image")


def _check_size(width: int, height: int, what: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{what} has an invalid size {width}x{height}")
    if width * height > max_pixels:
        raise InputError(
            f"{what} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:g} megapixels; resize it (e.g. to at most 4000 pixels on the long side) and try again"
        )


def _decode(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if not data:
        raise InputError(f"{what} is empty (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            # our own MAX_PIXELS check below is stricter than PIL's warning and names the size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # lazy: reads the header only; PIL raises
            # DecompressionBombError here for images over twice its own pixel limit
            _check_size(im.width, im.height, what, max_pixels)
            im.load()  # the actual decode; raises on corrupt or truncated data
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} looks like a decompression bomb and was refused ({e}); use a photo of at most "
                         f"{max_pixels / 1e6:g} megapixels") from e
    except UnidentifiedImageError as e:
        raise InputError(
            f"{what} is not an image file PIL can read (expected JPEG, PNG, GIF, WebP, BMP, TIFF...)"
        ) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        hint = "the file is truncated (incomplete download?)" if "truncated" in msg.lower() else "the file is corrupt"
        raise InputError(f"{what} could not be decoded: {hint} ({msg})") from e
    return _finish(im, what)


# Modes Pillow converts to RGB correctly by itself: 8 bits a channel (or 1 bit), no alpha.
_DIRECT_MODES = {"RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"}
# Modes with an alpha channel: composited on white. La / RGBa are premultiplied; Pillow un-premultiplies.
_ALPHA_MODES = {"RGBA": "RGBA", "LA": "LA", "PA": "RGBA", "La": "LA", "RGBa": "RGBA"}
# Modes of more than 8 bits a sample: scaled by their real bit depth (65535 -> 255), never clipped.
_DEEP_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def _bits_per_sample(im: Image.Image) -> int | None:
    """The bit depth the file declares for a deep (16/32-bit) image, or None when unknown.

    A TIFF says so in its BitsPerSample tag (a 12-bit scan is 12, not 16); a PNG deeper than
    8 bits is always 16 bits a sample (PNG scales 10- and 12-bit data up to 16 bits itself).
    """
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)  # BitsPerSample
        if isinstance(bits, (tuple, list)) and bits:
            bits = bits[0]
        if isinstance(bits, int) and 1 <= bits <= 32:
            return bits
    if im.format == "PNG":
        return 16
    return None


def _deep_to_rgb(im: Image.Image, what: str, bits: int | None) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit RGB, scaled by its real range.

    I;16*: 0..2**bits-1 (65535 for 16 bits) maps to 0..255. I (32-bit integers): the declared
    bit depth when the file gives one, else 8 bits when every value is within 0..255 and 16 bits
    when within 0..65535. F (floats): 0..1 maps to 0..255, else 0..255 is taken as it is. Any
    other range is refused: its brightness cannot be known.
    """
    import numpy as np

    mode = im.mode
    arr = np.asarray(im)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = arr.astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    fix = ("convert it to an 8-bit (or 16-bit) greyscale or RGB PNG or JPEG, scaled to the full range, "
           "and try again")
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"{what} is a floating-point image (mode F) with values that are not numbers "
                         f"(NaN or infinity); {fix}")
    if mode == "F":
        if lo >= 0.0 and hi <= 1.0:
            top = 1.0
        elif lo >= 0.0 and hi <= 255.0:
            top = 255.0
        else:
            raise InputError(f"{what} is a floating-point image (mode F) with values from {lo:g} to {hi:g}, "
                             f"outside 0..1 and 0..255, so its brightness is unknown; {fix}")
    else:
        declared = bits is not None
        if bits is None:
            bits = 16 if mode.startswith("I;16") else (8 if 0 <= lo and hi <= 255 else 16)
        top = float(2 ** bits - 1)
        if lo < 0 or hi > top:
            kind = "16-bit" if mode.startswith("I;16") else "32-bit integer"
            depth = f"outside the 0..{top:g} of its {bits}-bit depth" if declared or mode != "I" else \
                "outside 0..255 and 0..65535 (negative or deeper than 16 bits)"
            raise InputError(f"{what} is a {kind} image (mode {mode}) with values from {lo:g} to {hi:g}, "
                             f"{depth}, so its brightness is unknown; {fix}")
    grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Transparent pixels become white rather than whatever colour they hide."""
    rgba = im.convert(_ALPHA_MODES.get(im.mode, "RGBA")).convert("RGBA")
    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return bg


def _finish(im: Image.Image, what: str) -> Image.Image:
    """RGB, EXIF orientation applied, for every mode Pillow reads (see _to_rgb); InputError otherwise."""
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        bits = _bits_per_sample(im) if im.mode in _DEEP_MODES else None  # before a transpose drops the tags
        im = ImageOps.exif_transpose(im)  # removes the Orientation tag, so it is never applied twice
        return _to_rgb(im, what, bits)
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"{what} (mode {im.mode}) could not be converted to RGB: {e}; "
                         f"save it as an 8-bit RGB PNG or JPEG and try again") from e


def _to_rgb(im: Image.Image, what: str, bits: int | None = None) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info):
        return _flatten_alpha(im)
    if mode in _DEEP_MODES:
        return _deep_to_rgb(im, what, bits)
    if mode in _DIRECT_MODES:  # CMYK, YCbCr, LAB, HSV: Pillow's standard (ICC-less) conversions
        return im.convert("RGB")
    raise InputError(f"{what} has the pixel mode {mode!r}, which this loader does not convert to RGB; "
                     f"save it as an 8-bit RGB PNG or JPEG and try again")


def load_image(source: ImageSource, *, allow_url: bool = False, max_pixels: int = MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path, bytes, a PIL image, or (allow_url=True) an http(s) URL.

    EXIF orientation is applied. Raises InputError (see the module doc) on any bad input.
    `name`: how messages call the image (e.g. "the uploaded image photo.png"); default: its path.
    """
    if isinstance(source, Image.Image):
        what = name or f"image {source.width}x{source.height}"
        _check_size(source.width, source.height, what, max_pixels)
        return _finish(source, what)
    data, what = _read_bytes(source, allow_url)
    return _decode(data, name or what, max_pixels)


def image_sha256(source: ImageSource, *, allow_url: bool = False) -> str:
    """Hex SHA-256 of the image content: the file's bytes for a path / bytes / URL; for a PIL
    image (no file), the hash of its mode, size and pixel bytes."""
    if isinstance(source, Image.Image):
        h = hashlib.sha256()
        h.update(f"{source.mode}:{source.width}x{source.height}:".encode())
        h.update(source.tobytes())
        return h.hexdigest()
    data, _ = _read_bytes(source, allow_url)
    return hashlib.sha256(data).hexdigest()
