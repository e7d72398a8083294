"""Image and array steps shared by every model family, the server and the sidecar.

The counterpart of immich-ml ``immich_ml/models/transforms.py``: decoding an uploaded
image (with a pixel bound read from the header, and decode errors mapped to two
exceptions), the handle on the encoded bytes an image was decoded from (the GPU path
sends them to Triton instead of pixels), the image known from its header alone whose
pixels are decoded on first need (``EncodedImage``, the GPU path), PIL resize and centre crop, RGB -> BGR, and the
embedding serialisation of Immich's responses.
"""

from __future__ import annotations

import threading
import warnings
from io import BytesIO

import cv2
import numpy as np
import orjson
from PIL import Image

#: ``PIL.Image.info`` key holding the encoded bytes a decoded image came from.
_ENCODED = "immich_trt.encoded"
#: ``PIL.Image.info`` key holding the ``(width, height)`` those bytes decode to: PIL copies
#: ``info`` into resized copies, whose size then no longer matches.
_ENCODED_SIZE = "immich_trt.encoded_size"
#: Pillow format names whose GPU decode (nvJPEG and DALI's PNG/WebP decoders) was checked
#: bit-exact against Pillow; images of other formats are never sent as encoded bytes.
GPU_DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


class ImageTooLarge(ValueError):
    """The image header announces more pixels than ``IMMICH_TRT_MAX_IMAGE_PIXELS``
    (a decompression bomb, or simply too large); nothing was decoded."""

    @classmethod
    def of(cls, width: int, height: int, limit: int) -> ImageTooLarge:
        return cls(
            f"Image has {width * height} pixels ({width}x{height}); the limit is {limit} (IMMICH_TRT_MAX_IMAGE_PIXELS)"
        )


class UndecodableImage(ValueError):
    """Bytes Pillow cannot decode (truncated, corrupt, not an image, an unsupported
    format). The message is the name of the error Pillow raised."""


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """``Image.open`` of ``data``: the header only, no pixel decoded. Raises
    :class:`ImageTooLarge` (over ``max_pixels``, or over twice Pillow's own bound) and
    :class:`UndecodableImage` (a header Pillow cannot read)."""
    try:
        with warnings.catch_warnings():
            # our own bound replaces Pillow's warning; its hard error (2x its bound) still applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(BytesIO(data))
            except Image.DecompressionBombError as exc:  # over twice Pillow's own bound
                raise ImageTooLarge(str(exc)) from None
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageTooLarge.of(image.width, image.height, max_pixels)
    except ImageTooLarge:
        raise
    except Exception as exc:  # Pillow raises many types for bytes it cannot read
        raise UndecodableImage(type(exc).__name__) from exc
    return image


def _decode_rgb(image: Image.Image, data: bytes) -> Image.Image:
    """Decode an image :func:`_open` returned (``load()``; the one place pixels are
    decoded) and convert it to RGB when its mode differs. RGB and greyscale JPEG, PNG
    and WebP images keep a handle on ``data`` (see :func:`decode_pil`). Raises
    :class:`UndecodableImage` (``OSError`` for truncated data, ``SyntaxError``...)."""
    try:
        image.load()
        original_mode, original_format = image.mode, image.format
        if image.mode != "RGB":
            image = image.convert("RGB")
    except Exception as exc:  # Pillow raises many types for bytes it cannot decode
        raise UndecodableImage(type(exc).__name__) from exc
    if original_mode in ("RGB", "L") and original_format in GPU_DECODABLE_FORMATS:
        # other modes (CMYK, palette, alpha, 16-bit) keep the CPU path: a GPU decoder's
        # colour conversion need not match Pillow's convert("RGB"); other formats (AVIF,
        # HEIC, TIFF...) are not decoded on the GPU at all
        image.info[_ENCODED] = data
        image.info[_ENCODED_SIZE] = image.size
    return image


def decode_pil(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode an encoded image to RGB, as immich-ml ``decode_pil``.

    ``Image.open`` + ``load()``, converted to RGB when the mode differs; animated images
    give their first frame. EXIF orientation is not applied. RGB and greyscale JPEG, PNG
    and WebP images keep a handle on ``data`` (no copy; :func:`encoded_bytes`): the
    formats and modes a GPU decoder turns into the same pixels as Pillow.

    ``max_pixels`` bounds ``width * height`` as read from the header, before any pixel
    is decoded, so a tiny file announcing a huge image allocates nothing.

    Raises :class:`ImageTooLarge` (over ``max_pixels``, or over twice Pillow's own
    bound) and :class:`UndecodableImage` for anything Pillow cannot decode
    (``UnidentifiedImageError``, ``OSError`` for truncated data, ``SyntaxError``,
    ``ValueError``, ``EOFError`` for malformed headers...).
    """
    return _decode_rgb(_open(data, max_pixels), data)


class EncodedImage:
    """An uploaded image known from its header only (:func:`open_encoded`): the encoded
    bytes (``data``), the size in pixels (``size``, ``width``, ``height``) and Pillow's
    ``format`` and ``mode`` of the file. Its pixels are decoded by :meth:`rgb`, on first
    use and once, exactly as :func:`decode_pil` decodes them: the GPU path sends ``data``
    to the device and decodes on the CPU only for a step that needs pixels there (a
    format or mode the GPU does not decode as Pillow does, a fallback, a thumbnail)."""

    __slots__ = ("_header", "_lock", "_rgb", "data", "format", "mode", "size")

    def __init__(self, data: bytes, header: Image.Image) -> None:
        self.data = data
        self.size: tuple[int, int] = header.size
        self.format: str | None = header.format
        self.mode: str = header.mode
        self._header: Image.Image | None = header
        self._rgb: Image.Image | None = None
        self._lock = threading.Lock()

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @property
    def gpu_decodable(self) -> bool:
        """Whether a GPU decoder turns ``data`` into Pillow's pixels: an RGB or greyscale
        JPEG, PNG or WebP file (as :func:`decode_pil` keeps its bytes)."""
        return self.mode in ("RGB", "L") and self.format in GPU_DECODABLE_FORMATS

    def rgb(self) -> Image.Image:
        """The decoded RGB image, as :func:`decode_pil` gives it (decoded on the first
        call, by whichever thread makes it; later calls return the same image). Raises
        :class:`UndecodableImage` for pixels Pillow cannot decode, on every call."""
        with self._lock:
            if self._rgb is None:
                if self._header is None:
                    raise UndecodableImage("an earlier decode of this image failed")
                header, self._header = self._header, None
                self._rgb = _decode_rgb(header, self.data)
            return self._rgb

    def __repr__(self) -> str:
        state = "decoded" if self._rgb is not None else "not decoded"
        return f"<EncodedImage {self.format} {self.mode} {self.width}x{self.height}, {len(self.data)} bytes, {state}>"


#: What a model is given as the request's image: decoded pixels, or the file's header
#: with its pixels decoded on first use (:func:`pixels` gives the RGB image of either).
ImageInput = Image.Image | EncodedImage


def open_encoded(data: bytes, max_pixels: int | None = None) -> EncodedImage:
    """The request's image from its header alone (the GPU path): an
    :class:`EncodedImage` whose pixels are decoded when a step asks for them. Reading a
    header costs tens of microseconds, a decode milliseconds (a 1440 px JPEG: 8-18 ms),
    so run this one on the event loop and the decode (:func:`pixels`) in the executor.

    Raises :class:`ImageTooLarge` and, for a header Pillow cannot read,
    :class:`UndecodableImage` (as :func:`decode_pil`); pixels Pillow cannot decode
    raise :class:`UndecodableImage` only when a step asks for them."""
    return EncodedImage(data, _open(data, max_pixels))


def pixels(image: ImageInput) -> Image.Image:
    """The RGB pixels of a request's image: ``image`` itself, or the decode of an
    :class:`EncodedImage` (:meth:`EncodedImage.rgb`: once per image, in the calling
    thread, so call it from the executor). Raises :class:`UndecodableImage`."""
    return image.rgb() if isinstance(image, EncodedImage) else image


def encoded_bytes(image: ImageInput) -> bytes | None:
    """The encoded bytes ``image`` was decoded from by :func:`decode_pil` (or an
    :class:`EncodedImage`'s), or ``None``: never decoded from bytes, a format other than
    JPEG, PNG or WebP, a source mode other than RGB or greyscale, or a copy of another
    size (PIL copies ``info`` into resized copies)."""
    if isinstance(image, EncodedImage):
        return image.data if image.gpu_decodable else None
    data = image.info.get(_ENCODED)
    if not isinstance(data, bytes) or image.info.get(_ENCODED_SIZE) != image.size:
        return None
    return data


def resize_pil(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` with PIL BICUBIC; the longer side is
    ``int(long / short * size)`` (truncated), as immich-ml ``resize_pil``."""
    if image.width < image.height:
        return image.resize((size, int((image.height / image.width) * size)), resample=Image.Resampling.BICUBIC)
    return image.resize((int((image.width / image.height) * size), size), resample=Image.Resampling.BICUBIC)


def crop_pil(image: Image.Image, size: int) -> Image.Image:
    """Centre crop ``size x size`` with ``left = int(W/2 - size/2)``, as immich-ml ``crop_pil``."""
    left = int((image.size[0] / 2) - (size / 2))
    upper = int((image.size[1] / 2) - (size / 2))
    return image.crop((left, upper, left + size, upper + size))


def to_bgr(image: Image.Image) -> np.ndarray:
    """PIL RGB -> BGR ``uint8[H, W, 3]`` (immich-ml ``decode_cv2``)."""
    return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)


def serialize_np(array: np.ndarray) -> str:
    """``float32[D]`` -> ``"[f,f,...]"``: orjson's shortest float32 round-trip form, as
    immich-ml ``serialize_np`` (a valid pgvector literal)."""
    return orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY).decode()
