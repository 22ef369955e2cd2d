"""pointwise-zoo: efficient CNNs built on the 1x1 pointwise convolution (plain PyTorch)."""

from . import depthwise, kernels, layers, native, norm_act
from ._base import ClassifierMixin, adapt_input_conv
from ._loader import CheckpointLoadError, load_checkpoint, load_state_dict_file
from .cost import format_layer_table, layer_table, profile
from .features import FeatureInfo, FeatureListNet
from .fuse import fuse
from .int8 import Int8Model, quantize
from .layers import ConvMode
from .pointwise import PointwiseConv, pointwise_conv2d
from .pretrained import list_pretrained, pretrained_meta, pretrained_transforms
from .qat import QATSimulator, prepare_qat
from .registry import REFERENCES, convert_state_dict, create_model, list_models, register_model

# Importing the architecture files registers their models.
from . import mobilenet_v1, mobilenet_v2, mobilenet_v3, resnet, xception  # noqa: E402,F401

__all__ = [
    "pointwise_conv2d",
    "PointwiseConv",
    "ConvMode",
    "layers",
    "kernels",
    "norm_act",
    "create_model",
    "list_models",
    "register_model",
    "convert_state_dict",
    "REFERENCES",
    "list_pretrained",
    "pretrained_meta",
    "pretrained_transforms",
    "load_state_dict_file",
    "load_checkpoint",
    "CheckpointLoadError",
    "FeatureListNet",
    "FeatureInfo",
    "ClassifierMixin",
    "adapt_input_conv",
    "profile",
    "layer_table",
    "format_layer_table",
    "fuse",
    "quantize",
    "Int8Model",
    "prepare_qat",
    "QATSimulator",
]
