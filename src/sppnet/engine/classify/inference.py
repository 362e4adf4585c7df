"""A trained classifier at test time: loading it, accuracy with the paper's test
views (Sec. 3.1.2 - 3.1.4, :mod:`sppnet.engine.views`), prediction on files.

Accuracies are fractions in [0, 1]; with fewer than 5 classes "top-5" is top-K
with K the number of classes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from sppnet.data.images import DataWarning, ImageError, load_image
from sppnet.data.sources import SourceItem, SourceReport, iter_sources
from sppnet.data.transforms import resize_side
from sppnet.engine.classify.config import ClassifyConfig
from sppnet.engine.classify.data import ViewDataset, list_collate, make_loader
from sppnet.engine.common import UserError, load_weights, progress
from sppnet.engine.distributed import DistContext, all_reduce_sum
from sppnet.engine.views import check_size, check_views, prepare_views, score_views
from sppnet.models import get_model
from sppnet.utils import check_finite_tensors

__all__ = ["evaluate", "evaluate_counts", "inference_meta", "load_classifier", "predict", "predict_sources"]


def inference_meta(cfg: ClassifyConfig, model: nn.Module, classes: Sequence[str], epoch: int) -> dict:
    """The JSON meta stored beside the weights in ``model.safetensors`` (read by :func:`load_classifier`)."""
    return {
        "task": "classify",
        "model": model.name,
        "model_config": model.config(),
        "classes": list(classes),
        "size": cfg.size,
        "resize": resize_side(cfg.size),
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "epoch": epoch,
        "config": cfg.to_dict(),
    }


def load_classifier(
    run: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, list[str], ClassifyConfig]:
    """Loads a trained classifier for inference (never executes code from the file).

    Args:
        run: the run directory (holding ``model.safetensors``) or the file itself.
        device: where to put the model.

    Returns:
        ``(model in eval mode, classes, cfg)``.
    """
    path = Path(run)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: is {run} a classification run directory (sppnet classify train --out)?"
        )
    state, meta = load_weights(path, device="cpu")
    if meta.get("task") != "classify":
        raise UserError(f"{path} is not a classification model (task={meta.get('task')!r})")
    check_finite_tensors(state, f"weights in {path}", hint="the run diverged; train it again with a lower --lr")
    cfg = ClassifyConfig.from_dict(meta["config"])
    model = get_model(meta["model"], **meta["model_config"])
    model.load_state_dict(state)
    model.to(device).eval()
    return model, list(meta["classes"]), cfg


def evaluate_counts(
    model: nn.Module,
    dataset: Dataset,
    views: str,
    cfg: ClassifyConfig,
    ctx: DistContext | None = None,
    verbose: bool = False,
    cache: dict | None = None,
) -> tuple[float, float, float, float, float]:
    """``(top-1 correct, top-5 correct, images, views, loss)`` summed over all ranks (each rank scores its share).

    ``loss``: the cross-entropy of the view-averaged probabilities, ``-log p(label)``, summed over images.
    """
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    cfg = cfg.resolved()  # mean / std filled in
    check_views(views, model)
    check_size(model, cfg.size)
    was_training = model.training
    model.eval()
    indices = range(ctx.rank, len(dataset), ctx.world_size)
    data = ViewDataset(dataset, views, cfg.size, cfg.mean, cfg.std, indices, cache)
    per_batch = {"center": cfg.batch_size, "ten": max(1, cfg.batch_size // 10)}.get(views, 4)
    workers = 0 if cache is not None else cfg.workers
    loader = make_loader(data, per_batch, workers, 0, collate=list_collate, cuda=ctx.device.type == "cuda")
    k = min(5, model.num_classes)
    top1 = top5 = images = nviews = nll = 0.0
    with torch.no_grad():
        for batch in progress(loader, desc=f"eval {views}", total=len(loader), enabled=verbose):
            labels = torch.tensor([label for _, label in batch], device=ctx.device)
            if views in ("center", "ten"):
                x = torch.stack([p for p, _ in batch])  # [B, V, 3, s, s]
                b, v = x.shape[:2]
                logits = model(x.flatten(0, 1).to(ctx.device))  # [B * V, K]
                probs = F.softmax(logits.float(), 1).view(b, v, -1).mean(1)  # [B, K]
                nviews += b * v
            else:
                scored = [score_views(model, p, cfg.size) for p, _ in batch]  # [V_i, K] each
                probs = torch.stack([s.mean(0) for s in scored])  # [B, K]
                nviews += sum(s.shape[0] for s in scored)
            top = probs.topk(k, dim=1).indices  # [B, k]
            nll -= float(probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum())
            top1 += float((top[:, 0] == labels).sum())
            top5 += float((top == labels[:, None]).any(1).sum())
            images += len(batch)
    model.train(was_training)
    return tuple(all_reduce_sum([top1, top5, images, nviews, nll], ctx))  # type: ignore[return-value]


def evaluate(
    model: nn.Module, dataset: Dataset, views: str = "center", cfg: ClassifyConfig | None = None, verbose: bool = False
) -> dict:
    """Top-1 / top-5 accuracy of ``model`` on ``dataset`` with the given test views.

    Args:
        model: a trained ``SPPNet`` (see :func:`load_classifier`).
        dataset: yields ``(PIL.Image RGB, int label)``.
        views: ``center``, ``ten``, ``full`` or ``multi`` (:mod:`sppnet.engine.views`).
        cfg: provides ``size``, ``batch_size`` and ``workers`` (default: the
            ``small`` preset's, with ``size = model.input_size`` for a no-SPP model).
        verbose: progress bar.

    Returns:
        ``{"top1", "top5"`` (fractions), ``"images", "views"`` (the view set's
        name), ``"views_per_image"}``.
    """
    cfg = cfg or _default_cfg(model)
    if len(dataset) == 0:
        raise UserError("the evaluation set is empty")
    top1, top5, n, nviews, _ = evaluate_counts(model, dataset, views, cfg, verbose=verbose)
    return {"top1": top1 / n, "top5": top5 / n, "images": int(n), "views": views, "views_per_image": nviews / n}


def _default_cfg(model: nn.Module) -> ClassifyConfig:
    """The ``small`` preset's settings with the model's input size and normalisation."""
    norm = {"mean": tuple(model.mean), "std": tuple(model.std)} if hasattr(model, "mean") else {}
    if getattr(model, "spp", True):
        return ClassifyConfig(**norm).resolved()
    return ClassifyConfig(size=model.input_size, small_size=model.input_size, **norm).resolved()


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Iterable[str | os.PathLike | Image.Image | SourceItem],
    classes: Sequence[str],
    views: str = "center",
    topk: int = 5,
    cfg: ClassifyConfig | None = None,
) -> list[dict]:
    """Top-k classes of images of any size.

    Args:
        model: a trained ``SPPNet`` in eval mode.
        images: file paths (read with ``load_image``: EXIF-rotated, grey / RGBA
            converted; an unreadable one is skipped with a ``DataWarning`` naming
            it), PIL images, or the items of :func:`~sppnet.data.sources.iter_sources`.
        classes: class names in label order.
        views: ``center``, ``ten``, ``full`` or ``multi``.
        topk: classes per image (at most ``len(classes)``).
        cfg: provides ``size`` (see :func:`evaluate`).

    Returns:
        One ``{"image": path or index, "top": [{"class", "index", "prob"}, ...]}``
        per image read, most probable first; source items also give ``name``
        (and ``frame`` for a video frame).

    Raises:
        UserError: file paths were given and none could be read.
    """
    cfg = (cfg or _default_cfg(model)).resolved()
    check_views(views, model)
    check_size(model, cfg.size)
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    k = max(1, min(int(topk), len(classes)))
    model.eval()
    results, bad = [], []
    for i, item in enumerate(images):
        extra: dict = {}
        if isinstance(item, Image.Image):
            img, name = item, i
        elif isinstance(item, SourceItem):
            img, name = item.image, str(item.path)
            extra = {"name": item.name} | ({"frame": item.frame_index} if item.is_frame else {})
        else:
            try:
                img, name = load_image(item), str(item)
            except ImageError as e:  # a batch survives its bad members (issue 18)
                warnings.warn(f"skipping {e.path}: {e.detail}", DataWarning, stacklevel=2)
                bad.append(e.path)
                continue
        probs = score_views(model, prepare_views(img, views, cfg.size, cfg.mean, cfg.std), cfg.size).mean(0)
        p, idx = probs.topk(k)
        top = [
            {"class": classes[j], "index": int(j), "prob": float(q)}
            for q, j in zip(p.tolist(), idx.tolist(), strict=True)
        ]
        results.append({"image": name, **extra, "top": top})
    if bad and not results:
        raise UserError(f"none of the {len(bad)} images could be read: {', '.join(bad[:5])}")
    return results


def predict_sources(
    model: nn.Module,
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    classes: Sequence[str],
    views: str = "center",
    topk: int = 5,
    cfg: ClassifyConfig | None = None,
    *,
    recursive: bool = False,
    strict: bool = False,
    video_stride: int = 1,
    report: SourceReport | None = None,
) -> list[dict]:
    """:func:`predict` on image files, folders, glob patterns and videos (:mod:`sppnet.data.sources`).

    Bad sources are skipped with a warning naming them and counted in ``report``.

    Raises:
        SourceError: nothing could be read, or a bad source with ``strict``.
    """
    items = iter_sources(sources, recursive=recursive, strict=strict, video_stride=video_stride, report=report)
    return predict(model, items, classes, views, topk, cfg)
