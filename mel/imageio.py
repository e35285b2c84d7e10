"""Loading user images safely: one function, clear errors.

`load_image` accepts a path, raw bytes, a PIL image or (only with allow_url=True) an http(s)
URL, and returns an RGB PIL image with its EXIF orientation applied. Every failure a user can
cause raises InputError with a message that says what was wrong:

- a missing path, a directory, an empty file;
- bytes that are not an image, or a corrupt / truncated image;
- an image whose header announces more than MAX_PIXELS pixels (checked before decoding, so a
  huge image is refused without allocating it), or a decompression bomb;
- a URL without allow_url=True, a URL that cannot be fetched, or one larger than MAX_URL_BYTES.
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


def _finish(im: Image.Image, what: str) -> Image.Image:
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im = ImageOps.exif_transpose(im)
        if im.mode != "RGB":
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # transparent pixels become white rather than whatever colour they hide
                rgba = im.convert("RGBA")
                bg = Image.new("RGB", rgba.size, (255, 255, 255))
                bg.paste(rgba, mask=rgba.getchannel("A"))
                im = bg
            else:
                im = im.convert("RGB")
        else:
            im = im.copy()
    except (OSError, ValueError) as e:
        raise InputError(f"{what} could not be converted to RGB: {e}") from e
    return im


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
