"""torch.hub entry points: ``torch.hub.load(REPO, "zf5", spp=True, num_classes=10)``.

Builds any registered model: the Table 1 networks and torchvision's ``alexnet``,
``vgg16``, ``resnet50``. Nothing is downloaded unless asked for: the torchvision
backbones take ``weights="IMAGENET1K_V1"`` (torchvision's weights, fetched into
``$TORCH_HOME``) or ``weights=FILE`` (a local torchvision ``.pth`` / ``.safetensors``
state dict). Pass ``checkpoint=PATH`` to load a local ``model.safetensors``
written by ``sppnet classify train`` (safetensors only: loading never executes
code from the file).
"""

import os
import sys

dependencies = ["torch", "torchvision"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from sppnet.models import get_model as _get_model  # noqa: E402
from sppnet.models import list_models as _list_models  # noqa: E402


def _load(name, checkpoint=None, **kwargs):
    if checkpoint is None:
        return _get_model(name, **kwargs)
    from sppnet.engine.common import load_weights

    state, meta = load_weights(checkpoint)
    config = dict(meta.get("model_config", {}))
    config.update(kwargs)
    model = _get_model(meta.get("model", name), **config)
    model.load_state_dict(state)
    return model


def _entry(name):
    def build(checkpoint=None, **kwargs):
        return _load(name, checkpoint=checkpoint, **kwargs)

    build.__name__ = name
    build.__doc__ = f"SPP-net {name}. kwargs: spp, num_classes, levels, width, fc_dim, dropout (and weights)."
    return build


for _name in _list_models():
    globals()[_name] = _entry(_name)
