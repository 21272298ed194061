"""The embedding stage: the split preprocessing gives the model's own numbers."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from PIL import Image
from skimage import data

from extractors.embedding.embed import split_transform


@pytest.mark.parametrize("which", ["timm", "torchvision"])
def test_split_transform_matches_the_original(backbone, which) -> None:
    tf = backbone.transform if which == "timm" else tvm.ResNet50_Weights.DEFAULT.transforms()
    split = split_transform(tf)
    assert split is not None
    img = Image.fromarray(data.astronaut())
    ours = split.finish(split.to_uint8(img)[None])[0]
    theirs = tf(img)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5)
