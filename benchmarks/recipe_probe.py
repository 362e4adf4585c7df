"""Recipe probe: one classifier variant on an ImageFolder set, in-process, epochs bounded.

Not the product (``sppnet classify train`` is): a minimal loop over the same
augmentation (``TrainTransform``) and networks, to compare recipe variants
quickly. Prints ``epoch:train_acc/val_top1`` (validation every third epoch,
centre crop). Usage::

    OMP_NUM_THREADS=1 python benchmarks/recipe_probe.py '{"lr": 3e-3, "warm": 2}' NAME
    OMP_NUM_THREADS=1 python benchmarks/recipe_probe.py '{"levels": [1]}' global-max-pool
    OMP_NUM_THREADS=1 python benchmarks/recipe_probe.py '{"model": "vgg", "w": 16}' vgg-style

Keys: data (default /tmp/shapes), size, epochs, lr, wd, warm, scale, jitter,
alphastd, grey, bs, ls, onecycle, fcstd (fc6 / fc7 init std), fcinit
(``kaiming``: fc6 / fc7 He-initialised), clszero (the classifier starts at 0), headlr (lr
multiplier of fc6-fc8), poolbn (batch norm on the pooled vector), head
(``linear``: the pyramid straight into the classifier, no fc6 / fc7), lvlscale
(level n's values times n**-lvlscale before fc6), fclr (lr multiplier of fc6 / fc7
only), ema (decay of a weight average, validated beside the raw weights), steps
(epochs from which lr / 10), aux (weight of an auxiliary classifier's loss on
conv5's global max pool), and any ``get_model`` argument (model, width, fc_dim, norm, fc_norm, levels);
``model: vgg`` is a plain 3x3 batch-norm CNN of width ``w`` with global max pooling, the reference point.
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from sppnet.data.imagefolder import ImageFolderDataset
from sppnet.data.images import pil_to_tensor
from sppnet.data.transforms import TrainTransform, crop_boxes, normalize, resize_short_side, resize_side
from sppnet.models import get_model

torch.set_num_threads(int(os.environ.get("T", "1")))
args = json.loads(sys.argv[1])
name = sys.argv[2]
root = args.pop("data", "/tmp/shapes")
size = args.pop("size", 112)
epochs = args.pop("epochs", 12)
lr = args.pop("lr", 1e-3)
wd = args.pop("wd", 0.05)
warm = args.pop("warm", 1.0)
scale = args.pop("scale", 0.6)
jit = args.pop("jitter", 0.3)
grey = args.pop("grey", 0.0)
bs = args.pop("bs", 32)
ls = args.pop("ls", 0.0)
onecycle = args.pop("onecycle", 0)
alphastd = args.pop("alphastd", 0.1)
head = args.pop("head", "fc")
fcstd = args.pop("fcstd", None)
fcinit = args.pop("fcinit", None)
clszero = args.pop("clszero", 0)
headlr = args.pop("headlr", 1.0)
fclr = args.pop("fclr", None)
ema_decay = args.pop("ema", 0.0)
aux_w = args.pop("aux", 0.0)
lr_steps = args.pop("steps", [])
poolbn = args.pop("poolbn", 0)
lvlscale = args.pop("lvlscale", 0.0)
tr = ImageFolderDataset(root, "train")
va = ImageFolderDataset(root, "val")
K = len(tr.classes)
imgs = [(resize_short_side(tr[i][0].convert("RGB"), resize_side(size)), tr[i][1]) for i in range(len(tr))]
vimgs = [(va[i][0].convert("RGB"), va[i][1]) for i in range(len(va))]
mk = dict(model="overfeat5", width=0.125, fc_dim=256, norm="bn", fc_norm=True, levels=(6, 3, 2, 1))
mk.update(args)
if mk["model"] == "vgg":

    def blk(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    w = mk.get("w", 32)
    model = nn.Sequential(
        *blk(3, w),
        nn.MaxPool2d(2),
        *blk(w, 2 * w),
        nn.MaxPool2d(2),
        *blk(2 * w, 4 * w),
        nn.MaxPool2d(2),
        *blk(4 * w, 4 * w),
        nn.MaxPool2d(2),
        *blk(4 * w, 8 * w),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, K),
    )
    model.num_classes = K
else:
    model = get_model(mk.pop("model"), num_classes=K, **mk)
    if head == "linear":  # the pyramid straight into the classifier: no fc6 / fc7
        model.fc = nn.Identity()
        model.classifier = nn.Linear(model.pooled_dim, K)
    if fcstd is not None:  # the fc6 / fc7 weights drawn with this std instead of 0.01
        for m in model.fc.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, fcstd)
    if fcinit == "kaiming":  # fc6 / fc7 He-initialised (fan in) instead of N(0, 0.01)
        for m in model.fc.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    if clszero:  # the classifier (fc8) starts at 0: logits 0, nothing but class signal reaches fc7 at first
        nn.init.zeros_(model.classifier.weight)
    if poolbn:  # batch norm on the pooled vector, before fc6
        model.fc = nn.Sequential(nn.BatchNorm1d(model.pooled_dim), *model.fc)
    if lvlscale:  # each pyramid level's n*n*C values scaled by n**-lvlscale before fc6
        c5 = model.feature_channels
        w = torch.cat([torch.full((c5 * n * n,), float(n) ** -lvlscale) for n in model.levels])

        class _Scale(nn.Module):
            def forward(self, x):
                return x * w

        model.fc = nn.Sequential(_Scale(), *model.fc)
aux_head = None
if aux_w:  # an auxiliary classifier on the globally max-pooled conv5 (training only)
    aux_head = nn.Linear(model.feature_channels, K)
    model.aux_head = aux_head
groups = []
parts = [(model, 1.0)]
if headlr != 1.0:
    parts = [(model.features, 1.0), (nn.ModuleList([model.fc, model.classifier]), headlr)]
if fclr is not None:  # lr multiplier of fc6 / fc7 only (the classifier keeps 1)
    parts = [(nn.ModuleList([model.features, model.classifier]), 1.0), (model.fc, fclr)]
for part, mult in parts:
    ps = list(part.named_parameters())
    groups += [
        {"params": [p for n, p in ps if p.ndim > 1], "weight_decay": wd, "mult": mult},
        {"params": [p for n, p in ps if p.ndim <= 1], "weight_decay": 0, "mult": mult},
    ]
opt = torch.optim.AdamW(groups, lr=lr)
tf = TrainTransform(size, crop="random", scale=(scale, 1), jitter=jit, alphastd=alphastd)
steps_per = math.ceil(len(imgs) / bs)
total = epochs * steps_per


def cen(im):
    r = resize_short_side(im, resize_side(size))
    return normalize(pil_to_tensor(r.crop(crop_boxes(*r.size, size)[4])), tf.mean, tf.std)


VX = torch.stack([cen(im) for im, _ in vimgs])
VY = torch.tensor([label for _, label in vimgs])
ema = None
if ema_decay:  # an exponential moving average of the weights and the batch-norm statistics
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay), use_buffers=True
    )
t0 = time.perf_counter()
step = 0
out = []
for ep in range(epochs):
    g = torch.Generator().manual_seed(ep)
    perm = torch.randperm(len(imgs), generator=g).tolist()
    model.train()
    corr = 0
    lsum = 0
    for b in range(steps_per):
        idx = perm[b * bs : (b + 1) * bs]
        px = []
        co = []
        for i in idx:
            p, c = tf.geometric(imgs[i][0], g)
            px.append(p)
            co.append(c)
        x = tf.photometric(torch.stack(px), torch.stack(co))
        if grey > 0:
            m = torch.rand(len(idx), generator=g) < grey
            gx = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(x)
            x = torch.where(m.view(-1, 1, 1, 1), gx, x)
        y = torch.tensor([imgs[i][1] for i in idx])
        if onecycle:
            f = (step + 1) / total
            cur = lr * (f / 0.15 if f < 0.15 else 0.5 * (1 + math.cos(math.pi * (f - 0.15) / 0.85)))
        else:
            cur = lr * min(1, (step + 1) / (warm * steps_per)) if warm > 0 else lr
            cur *= 0.1 ** sum(ep >= s for s in lr_steps)
        for gr in opt.param_groups:
            gr["lr"] = cur * gr.get("mult", 1.0)
        if aux_head is not None:
            maps = model.forward_features(x)
            lo = model.forward_head(maps)
            loss = F.cross_entropy(lo, y, label_smoothing=ls) + aux_w * F.cross_entropy(
                aux_head(maps.amax(dim=(2, 3))), y, label_smoothing=ls
            )
        else:
            lo = model(x)
            loss = F.cross_entropy(lo, y, label_smoothing=ls)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if ema is not None:
            ema.update_parameters(model)
        corr += (lo.argmax(1) == y).sum().item()
        lsum += loss.item() * len(idx)
    if ep % 3 == 2 or ep == epochs - 1:
        model.eval()
        with torch.no_grad():
            c = 0
            for j in range(0, len(VX), 100):
                c += (model(VX[j : j + 100]).argmax(1) == VY[j : j + 100]).sum().item()
        v = c / len(VX)
        if ema is not None:
            ema.eval()
            with torch.no_grad():
                c = sum(
                    (ema(VX[j : j + 100]).argmax(1) == VY[j : j + 100]).sum().item() for j in range(0, len(VX), 100)
                )
            out.append(f"ema{ep + 1}:{c / len(VX):.3f}")
    else:
        v = float("nan")
    out.append(f"{ep + 1}:{corr / len(imgs):.2f}/{v:.3f}")
print(name, f"{time.perf_counter() - t0:.0f}s", " ".join(out), flush=True)
