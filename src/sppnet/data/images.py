"""Image files in, RGB images and ``[0, 1]`` tensors out, with errors that name the file.

Every data set in :mod:`sppnet.data` opens its pictures through :func:`load_image`,
so they all agree on what a picture is:

* EXIF orientation is applied (a phone photo tagged "rotate 90" comes out upright,
  with width and height swapped);
* every Pillow mode becomes 8-bit RGB: grey, palette and 1-bit images are expanded;
  transparency is composited on white; 16-bit grey (``I;16``, ``I``) is *scaled*
  from ``0..65535`` to ``0..255`` (not clipped, which would turn it white);
* the pixels are decoded at once, so a truncated or corrupt file fails in
  :func:`load_image`, not later inside a transform.

Anything that cannot be read raises :class:`ImageError` (a ``ValueError``) whose
message starts with the path and whose ``reason`` is a short category used by
:class:`SkipCounter` to summarise a scan ("skipped 3 of 120 images: 2 corrupt,
1 not an image").

Size limits: a small file can declare a gigantic canvas (a decompression bomb)
or an absurd shape. The header is read first and checked against
:class:`~sppnet.data.limits.ImageLimits` (pixels, aspect ratio, short side)
before any pixel is decoded; a refusal names the file and the CLI flag that
raises the limit (``--max-image-pixels``, ...). Pass ``limits`` for one call, or
set them for the process with :func:`~sppnet.data.limits.set_image_limits`.
:func:`read_image_size` reads the upright size from the header alone.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from sppnet.data.limits import ImageLimits, get_image_limits, set_image_limits

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataWarning",
    "ImageError",
    "SkipCounter",
    "check_image_size",
    "load_image",
    "pil_to_tensor",
    "read_image_size",
    "set_max_image_pixels",
    "to_rgb",
]

#: File name endings (lower case) that the folder data sets treat as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)

# Pillow keeps its own bomb limit in a module global. We only touch it (briefly,
# under this lock) when the caller explicitly allowed a larger image than Pillow would.
_PILLOW_LIMIT_LOCK = threading.Lock()


class DataWarning(UserWarning):
    """Warning category for skipped files and annotations (filter it with ``warnings``)."""


class ImageError(ValueError):
    """An image file that cannot be used.

    Attributes:
        path (str): the file.
        reason (str): short category, one of ``"missing"``, ``"empty"``,
            ``"not an image"``, ``"corrupt"``, ``"unsupported mode"``, or a limit's
            (``"too large"``, ``"too elongated"``, ``"too small"``, ``"too large to
            search"``, see :meth:`~sppnet.data.limits.ImageLimits.problem`).
    """

    def __init__(self, path: str | os.PathLike, reason: str, detail: str) -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


def set_max_image_pixels(limit: int | None) -> None:
    """Sets the process-wide decompression-bomb limit (``--max-image-pixels``).

    Shorthand for ``set_image_limits(max_pixels=limit)``.

    Args:
        limit: largest accepted ``width * height``; ``None`` disables the check.
    """
    set_image_limits(max_pixels=limit)


def _open_lazily(path: Path, limit: int | None) -> Image.Image:
    """Opens ``path`` (header only), applying ``limit`` instead of Pillow's bomb limit."""
    with warnings.catch_warnings():
        # We run our own check below with our own limit; Pillow's warning would be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError as exc:
            pillow_limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and pillow_limit is not None and limit <= 2 * pillow_limit:
                raise ImageError(
                    path,
                    "too large",
                    f"decompression bomb refused: more than {limit} pixels, "
                    f"raise the limit with --max-image-pixels if the file is "
                    f"trusted (Pillow: {exc})",
                ) from exc
        # The caller allowed more pixels than Pillow does: open once more without
        # Pillow's check; ours follows in load_image. (Pillow code running in other
        # threads during these microseconds sees no limit either.)
        with _PILLOW_LIMIT_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                return Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def _scale_to_uint8(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Maps ``values`` to ``0..255``: by ``full_scale`` if given, else by their own range."""
    values = values.astype(np.float64)
    if full_scale is None:
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    else:
        values = values / full_scale
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts a Pillow image of any mode to 8-bit RGB.

    Transparent pixels are composited on white. 16-bit grey (``I;16*``) is divided by
    257 (``65535 -> 255``); 32-bit integer grey (``I``, how Pillow opens many 16-bit
    PNG/TIFF files) is read as 16-bit when its values lie in ``0..65535`` and
    stretched from its own min..max otherwise; float grey (``F``) is read as
    ``0..1`` when it lies there and stretched otherwise.

    Args:
        img: any Pillow image (``1, L, P, LA, PA, RGBA, CMYK, YCbCr, I;16, I, F, ...``).

    Returns:
        A new ``RGB`` image of the same size.

    Raises:
        ValueError: if Pillow cannot convert the mode to RGB.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img)
        in_16_bit_range = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        grey = _scale_to_uint8(values, 65535.0 if in_16_bit_range else None)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(img)
        in_unit_range = values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0)
        grey = _scale_to_uint8(values, 1.0 if in_unit_range else None)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert Pillow mode {mode!r} to RGB: {exc}") from exc


def _resolve_limits(limits: ImageLimits | None, max_pixels: int | None) -> ImageLimits:
    limits = get_image_limits() if limits is None else limits
    if not isinstance(limits, ImageLimits):
        raise ValueError(f"limits must be an ImageLimits or None, got {type(limits).__name__}")
    return limits if max_pixels is None else limits.replace(max_pixels=max_pixels)


def _open_header(path: Path, limits: ImageLimits) -> Image.Image:
    """Opens ``path`` lazily (header only) or raises an :class:`ImageError` naming it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "missing", "file not found") from None
    except OSError as exc:
        raise ImageError(path, "missing", f"cannot stat file: {exc}") from exc
    if not path.is_file():
        raise ImageError(path, "not an image", "not a regular file")
    if size == 0:
        raise ImageError(path, "empty", "empty file (0 bytes)")
    try:
        return _open_lazily(path, limits.max_pixels)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image", "not an image file Pillow can identify") from None
    except Exception as exc:  # Pillow's plugins raise many types on garbage headers.
        raise ImageError(path, "corrupt", f"cannot read image header: {exc}") from exc


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, from the header (no pixels decoded).

    ``Image.Image.getexif`` is called on the base class: PNG's override decodes
    the whole image to look for an ``eXIf`` chunk after the pixel data.
    """
    width, height = img.size
    try:
        orientation = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block: load_image's exif_transpose decides later
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def check_image_size(path: str | os.PathLike, width: int, height: int, limits: ImageLimits | None = None) -> None:
    """Raises an :class:`ImageError` naming ``path`` if ``width x height`` breaks ``limits``.

    Args:
        path: the file (only named in the message).
        width, height: its size in pixels.
        limits: ``None``: the process-wide limits (:func:`~sppnet.data.limits.get_image_limits`).
    """
    problem = _resolve_limits(limits, None).problem(width, height)
    if problem is not None:
        raise ImageError(path, *problem)


def read_image_size(path: str | os.PathLike, limits: ImageLimits | None = None) -> tuple[int, int]:
    """The upright ``(width, height)`` of an image file, from its header; no pixels are decoded.

    This is the size :func:`load_image` returns (EXIF orientations 5-8 swap the
    two), except for a PNG whose EXIF block follows its pixel data.

    Args:
        path: the file.
        limits: size limits to check (``None``: the process-wide ones).

    Raises:
        ImageError: the file is missing, empty, not an image, has a corrupt
            header, or breaks ``limits`` (naming the flag that raises them).
    """
    path = Path(path)
    limits = _resolve_limits(limits, None)
    with _open_header(path, limits) as img:
        width, height = _upright_size(img)
    check_image_size(path, width, height, limits)
    return width, height


def load_image(
    path: str | os.PathLike, max_pixels: int | None = None, limits: ImageLimits | None = None
) -> Image.Image:
    """Reads an image file as an upright, fully decoded 8-bit RGB Pillow image.

    The header is checked against the size limits before any pixel is decoded.

    Args:
        path: the file.
        max_pixels: largest accepted ``width * height``, overriding ``limits.max_pixels``.
        limits: pixel, aspect-ratio and short-side limits; ``None``: the
            process-wide ones (:func:`~sppnet.data.limits.set_image_limits`).

    Returns:
        ``PIL.Image.Image`` in mode ``RGB``, EXIF orientation applied (so for
        orientations 5-8 width and height are swapped relative to the stored pixels).

    Raises:
        ImageError: the file is missing, empty, not an image, truncated or
            corrupt, outside the limits (the message names the flag that raises
            them, e.g. ``--max-image-pixels``), or in a mode that has no RGB form.
            The message starts with the path.
    """
    path = Path(path)
    limits = _resolve_limits(limits, max_pixels)
    with _open_header(path, limits) as img:
        check_image_size(path, *img.size, limits)
        try:
            img.load()  # decode now: truncated data fails here, not in a transform
            upright = ImageOps.exif_transpose(img)
        except Exception as exc:
            raise ImageError(path, "corrupt", f"truncated or corrupt image data: {exc}") from exc
        try:
            rgb = to_rgb(upright)
        except ValueError as exc:
            raise ImageError(path, "unsupported mode", str(exc)) from exc
    return rgb  # a new image (to_rgb never returns its input), detached from the file


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Converts a Pillow image to a float tensor.

    Args:
        img: any Pillow image; non-RGB modes go through :func:`to_rgb` first.

    Returns:
        Tensor[3, H, W], ``float32`` in ``[0, 1]`` (8-bit value / 255).
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    array = np.array(img, dtype=np.uint8)  # [H, W, 3], a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


class SkipCounter:
    """Records items skipped while reading a data set, warning once per item.

    Each :meth:`skip` emits a :class:`DataWarning` naming the file and the reason,
    and :meth:`summary` turns the lot into one line::

        >>> counter = SkipCounter("images")
        >>> counter.skip("a.jpg", "corrupt", "truncated image data")  # warns
        >>> counter.summary(total=120)
        'skipped 1 of 120 images: 1 corrupt'

    Args:
        what: plural noun used in the summary ("images", "objects").
        warn: emit a warning for every skip.

    Attributes:
        items (list[tuple[str, str, str]]): ``(path, reason, detail)`` per skip.
    """

    def __init__(self, what: str = "images", warn: bool = True) -> None:
        self.what = what
        self.warn = warn
        self.items: list[tuple[str, str, str]] = []

    def skip(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        """Records one skipped item.

        Args:
            path: the file (or ``file#item`` for a part of a file).
            reason: short category, counted in the summary (e.g. ``"corrupt"``).
            detail: longer explanation for the warning; defaults to ``reason``.
        """
        detail = detail or reason
        self.items.append((str(path), reason, detail))
        if self.warn:
            warnings.warn(f"skipping {path}: {detail}", DataWarning, stacklevel=2)

    def skip_error(self, error: ImageError) -> None:
        """Records an :class:`ImageError` as a skip."""
        self.items.append((error.path, error.reason, error.detail))
        if self.warn:
            warnings.warn(f"skipping {error.path}: {error.detail}", DataWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def counts(self) -> dict[str, int]:
        """Number of skips per reason, most frequent first (ties by name)."""
        counts = Counter(reason for _, reason, _ in self.items)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def paths(self) -> list[str]:
        """The skipped paths, in the order they were skipped."""
        return [path for path, _, _ in self.items]

    def summary(self, total: int | None = None) -> str:
        """One line, e.g. ``"skipped 3 of 120 images: 2 corrupt, 1 not an image"``.

        Args:
            total: number of items looked at (skipped ones included), if known.
        """
        of = f" of {total}" if total is not None else ""
        head = f"skipped {len(self.items)}{of} {self.what}"
        if not self.items:
            return head
        return head + ": " + ", ".join(f"{n} {reason}" for reason, n in self.counts.items())

    def __repr__(self) -> str:
        return f"SkipCounter({self.summary()!r})"
