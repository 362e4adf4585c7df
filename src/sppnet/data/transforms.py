"""The paper's image transforms (SPP-net Sec. 3.1, after AlexNet), scaled with ``size``.

Training (:class:`TrainTransform`), for a crop side ``size`` (224 in the paper):

1. resize so the SHORT side is ``resize_side(size) = round(size * 256 / 224)``
   (256 for the paper's 224), aspect ratio kept;
2. cut a ``size x size`` crop from one of the four corners or the centre of the
   ENTIRE resized image, chosen uniformly at random;
3. flip it horizontally with probability 1/2;
4. multi-size training: RESIZE the crop to the epoch's input size (e.g. 180 for
   224 in the paper): the same content at a lower resolution, never a smaller crop;
5. colour altering: AlexNet's PCA lighting noise -- add
   ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, 0.1)`` per image, to every pixel
   (ImageNet's RGB eigen-decomposition, the constants every AlexNet
   reimplementation uses; the built-in shapes data have random colours, so the
   noise is a mild, label-preserving perturbation there as on photographs);
6. normalise with the ImageNet channel mean / std.

Beyond the paper (``crop="random"``, ``jitter > 0``), for training from scratch
on small data sets: step 2 becomes a crop of a random area fraction
(``scale``) and aspect ratio (``ratio``, log-uniform) of the ENTIRE image,
resized to the output size (Szegedy et al. 2015, "Going deeper with
convolutions", Sec. 6; torchvision's ``RandomResizedCrop``), and before step 5
brightness, contrast and saturation are each scaled by a factor drawn from
``[1 - jitter, 1 + jitter]`` (torchvision's ``ColorJitter`` without hue), then
clamped to [0, 1]. Flips and the PCA colour altering stay as in the paper.

Randomness comes from an explicit ``torch.Generator`` passed per call, so the
training loop can seed every sample from ``(seed, epoch, index)``: the result is
the same with 0 or N DataLoader workers, one process or many.

Test-time crops (centre, ten-view, full image) live in :mod:`sppnet.engine.views`;
they use the helpers below so training and testing agree on geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sppnet.data.images import to_rgb
from sppnet.data.limits import FLAGS, get_image_limits

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PCA_EIGVAL",
    "PCA_EIGVEC",
    "resize_side",
    "small_size_for",
    "resize_short_side",
    "crop_boxes",
    "normalize",
    "lighting",
    "lighting_shift",
    "color_jitter",
    "jitter_factors",
    "random_resized_box",
    "CROPS",
    "TrainTransform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# AlexNet (Krizhevsky et al. 2012, Sec. 4.1) colour altering: principal components
# of ImageNet's RGB pixel values (pixels in [0, 1]); columns of PCA_EIGVEC are the
# eigenvectors, as in fb.resnet.torch / timm.
PCA_EIGVAL: tuple[float, float, float] = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC: tuple[tuple[float, float, float], ...] = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
#: Training crops: the paper's five fixed crops, or random-resized crops of the whole image.
CROPS: tuple[str, ...] = ("paper", "random")


def resize_side(size: int) -> int:
    """Short side the image is resized to before ``size`` crops: 256 for 224 (Sec. 3.1)."""
    return int(round(size * 256 / 224))


def small_size_for(size: int) -> int:
    """The multi-size partner of ``size``: 180 for 224 (Sec. 2.3), ``round(size * 180 / 224)``."""
    return int(round(size * 180 / 224))


def resize_short_side(img: Image.Image, side: int) -> Image.Image:
    """Resizes ``img`` so that ``min(width, height) == side``, aspect ratio kept.

    Small images are upscaled, large ones downscaled (bilinear, antialiased).

    Raises:
        ValueError: ``side < 1``, or an aspect ratio above the ``max_aspect_ratio`` of
            :func:`~sppnet.data.limits.get_image_limits` (``--max-aspect-ratio``): resizing
            the short side of a 1 x 5000 strip to 256 would make a 1.3-gigapixel image.
    """
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"image has no pixels ({w}x{h})")
    limit = get_image_limits().max_aspect_ratio
    if limit is not None and max(w, h) > limit * min(w, h):
        raise ValueError(
            f"image of {w}x{h} pixels has aspect ratio {max(w, h) / min(w, h):.1f}, above the limit of {limit:g}; "
            f"raise it with {FLAGS['max_aspect_ratio']}"
        )
    if w <= h:
        new = (side, max(side, int(round(h * side / w))))
    else:
        new = (max(side, int(round(w * side / h))), side)
    if new == (w, h):
        return img
    return img.resize(new, Image.Resampling.BILINEAR)


def crop_boxes(width: int, height: int, size: int) -> list[tuple[int, int, int, int]]:
    """The five ``size x size`` crops of the paper, as PIL boxes ``(left, top, right, bottom)``.

    Order: top-left, top-right, bottom-left, bottom-right, centre. The centre
    crop starts at ``round((width - size) / 2)`` (torchvision's rule).

    Raises:
        ValueError: the image is smaller than ``size`` on a side.
    """
    if width < size or height < size:
        raise ValueError(f"cannot cut a {size}x{size} crop from a {width}x{height} image")
    r, b = width - size, height - size
    cx, cy = int(round(r / 2)), int(round(b / 2))
    corners = [(0, 0), (r, 0), (0, b), (r, b), (cx, cy)]
    return [(x, y, x + size, y + size) for x, y in corners]


def normalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """``(x - mean) / std`` per channel, for ``x (Tensor[3, H, W])`` or ``Tensor[N, 3, H, W]`` in [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


def lighting_shift(alphastd: float, generator: torch.Generator | None = None) -> Tensor:
    """The RGB shift of AlexNet's PCA colour noise: ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, alphastd)``.

    Returns ``Tensor[3]`` (zeros, and nothing drawn, when ``alphastd <= 0``).
    """
    if alphastd <= 0:
        return torch.zeros(3)
    alpha = torch.randn(3, generator=generator) * alphastd  # [3]
    eigvec = torch.tensor(PCA_EIGVEC)  # [3 (rgb), 3 (component)]
    return eigvec @ (alpha * torch.tensor(PCA_EIGVAL))  # [3]


def lighting(x: Tensor, alphastd: float, generator: torch.Generator | None = None) -> Tensor:
    """AlexNet's PCA colour noise on ``x (Tensor[3, H, W])`` in [0, 1] (not clamped, as AlexNet).

    ``x + eigvec @ (alpha * eigval)`` with ``alpha ~ N(0, alphastd)`` per channel.
    """
    if alphastd <= 0:
        return x
    return x + lighting_shift(alphastd, generator).to(x.dtype).view(3, 1, 1)


def jitter_factors(strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Brightness, contrast and saturation factors, each ``U[1 - strength, 1 + strength]``: ``Tensor[3]``.

    Ones, and nothing drawn, when ``strength <= 0``.
    """
    if strength <= 0:
        return torch.ones(3)
    return 1.0 + (2.0 * torch.rand(3, generator=generator) - 1.0) * strength


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601


def _jitter_batch(x: Tensor, factors: Tensor) -> Tensor:
    """:func:`color_jitter` on ``x [N, 3, H, W]``, per-image ``factors [N, 3]`` (brightness, contrast, saturation)."""
    b, c, s = (factors[:, i].to(x.dtype).view(-1, 1, 1, 1) for i in range(3))
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x * b).clamp_(0, 1)
    mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # [N, 1, 1, 1] mean grey level
    x = (mean + c * (x - mean)).clamp_(0, 1)
    grey = (x * luma).sum(1, keepdim=True)  # [N, 1, H, W]
    return (grey + s * (x - grey)).clamp_(0, 1)


def color_jitter(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Random brightness, contrast and saturation of ``x (Tensor[3, H, W])`` in [0, 1], clamped to [0, 1].

    Each factor is drawn uniformly from ``[1 - strength, 1 + strength]`` and the
    three are applied in that order: brightness ``x * b``; contrast
    ``m + c * (x - m)`` around the mean grey level ``m``; saturation
    ``g + s * (x - g)`` around each pixel's grey value ``g`` (ITU-R 601 luma).
    """
    if strength <= 0:
        return x
    return _jitter_batch(x[None], jitter_factors(strength, generator)[None])[0]


def random_resized_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """A crop of a random area fraction and aspect ratio of a ``width x height`` image, as a PIL box.

    Area ``a ~ U(scale) * width * height``, aspect ``r = w / h`` log-uniform in
    ``ratio``; up to 10 draws until the crop fits, then the largest centred crop
    whose aspect is clipped to ``ratio`` (torchvision's ``RandomResizedCrop`` rule).
    The position is uniform over the image.
    """
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = min(int(u[2] * (width - w + 1)), width - w)
            y = min(int(u[3] * (height - h + 1)), height - h)
            return x, y, x + w, y + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


class TrainTransform:
    """Training augmentation of SPP-net (see the module docstring).

    Args:
        size: crop side taken from the image resized to ``resize_side(size)``
            (224 in the paper).
        out_size: side the crop is resized to (the epoch's size in multi-size
            training; 180 for the paper's second size). ``None``: ``size``.
        flip: random horizontal flips.
        alphastd: strength of the PCA lighting noise (0.1 in AlexNet; 0 disables).
        mean, std: normalisation.
        crop: ``"paper"`` (five fixed crops) or ``"random"`` (random-resized
            crops of the whole image, resized to ``out_size``; see the module docstring).
        scale, ratio: area fraction and aspect-ratio range of ``crop="random"``.
        jitter: brightness / contrast / saturation strength (0 disables).

    ``transform(img, generator)`` takes an RGB ``PIL.Image`` and returns
    ``Tensor[3, out_size, out_size]``; all randomness is drawn from ``generator``.
    """

    def __init__(
        self,
        size: int,
        out_size: int | None = None,
        flip: bool = True,
        alphastd: float = 0.1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop: str = "paper",
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: float = 0.0,
    ) -> None:
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        out_size = size if out_size is None else int(out_size)
        if out_size < 1:
            raise ValueError(f"out_size must be >= 1, got {out_size}")
        self.size = int(size)
        self.out_size = out_size
        self.flip = bool(flip)
        self.alphastd = float(alphastd)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.crop = crop
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.jitter = float(jitter)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        pixels, colour = self.geometric(img, generator)
        return self.photometric(pixels[None], colour[None])[0]

    def geometric(self, img: Image.Image, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Steps 1-4 and the colour draws, without applying them (the per-image, CPU part).

        Returns ``(pixels, colour)``: the crop as ``uint8 Tensor[3, out_size, out_size]`` and
        ``Tensor[6]``, the jitter factors (brightness, contrast, saturation) and the
        lighting shift (RGB). :meth:`photometric` applies them to a whole batch at
        once; ``photometric(pixels[None], colour[None])[0]`` is ``self(img, generator)``.
        """
        if img.mode != "RGB":
            img = to_rgb(img)
        img = resize_short_side(img, resize_side(self.size))
        if self.crop == "paper":
            boxes = crop_boxes(img.width, img.height, self.size)
            box = boxes[int(torch.randint(len(boxes), (1,), generator=generator))]
        else:
            box = random_resized_box(img.width, img.height, self.scale, self.ratio, generator)
        img = img.crop(box)
        if self.flip and bool(torch.rand(1, generator=generator) < 0.5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if img.size != (self.out_size, self.out_size):  # multi-size: same content, lower resolution (Sec. 2.3)
            img = img.resize((self.out_size, self.out_size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W]
        colour = torch.cat([jitter_factors(self.jitter, generator), lighting_shift(self.alphastd, generator)])
        return pixels, colour

    def photometric(self, pixels: Tensor, colour: Tensor) -> Tensor:
        """Step 5 and 6 on a batch: ``uint8 [N, 3, H, W]`` and ``colour [N, 6]`` from :meth:`geometric`.

        Returns the normalised ``float32 [N, 3, H, W]`` on ``pixels``' device (a GPU
        batch is augmented there).
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3 or colour.shape != (pixels.shape[0], 6):
            raise ValueError(
                f"photometric needs pixels [N, 3, H, W] and colour [N, 6] from geometric(), got "
                f"{tuple(pixels.shape)} and {tuple(colour.shape)}"
            )
        x = pixels.float().div_(255.0)
        colour = colour.to(x.device)
        if self.jitter > 0:
            x = _jitter_batch(x, colour[:, :3])
        if self.alphastd > 0:
            x = x + colour[:, 3:].to(x.dtype).view(-1, 3, 1, 1)
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - m) / s

    def __repr__(self) -> str:
        return (
            f"TrainTransform(size={self.size}, out_size={self.out_size}, resize={resize_side(self.size)}, "
            f"flip={self.flip}, alphastd={self.alphastd}, crop={self.crop!r}, scale={self.scale}, "
            f"ratio={self.ratio}, jitter={self.jitter})"
        )
