"""Networks: the paper's classifiers (Table 1), torchvision backbones and the SPP-net detector."""

from sppnet.models._registry import get_model, list_models, register_model
from sppnet.models.freeze import feature_stages, freeze
from sppnet.models.geometry import FeatureGeometry, feature_geometry
from sppnet.models.sppnet import SPPNet
from sppnet.models.torchvision_backbones import TorchvisionSPPNet

__all__ = [
    "FeatureGeometry",
    "SPPNet",
    "TorchvisionSPPNet",
    "feature_geometry",
    "feature_stages",
    "freeze",
    "get_model",
    "list_models",
    "register_model",
]
