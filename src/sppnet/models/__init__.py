"""Networks: the paper's classifiers (Table 1) and the SPP-net detector."""

from sppnet.models._registry import get_model, list_models, register_model
from sppnet.models.sppnet import SPPNet

__all__ = ["get_model", "list_models", "register_model", "SPPNet"]
