"""Fine-tuning a real backbone on real images: groups, learning rates, freezing, resume, reuse,
and the fine-tuned network as a backbone of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors.embedding.backbones import create_backbone
from extractors.settings import SettingsError
from heads.evaluate import METRICS
from heads.finetune.data import FineTuneError, LabelledImages
from heads.finetune.loop import CHECKPOINT, frozen_groups, param_groups
from heads.finetune.network import FineTuneNet, layer_groups
from heads.finetune.outcome import DONE
from heads.finetune.run import finetune
from heads.settings import FineTuneSettings

SMALL = {"image_size": 32, "batch_size": 16, "flip": False}


def _data(store) -> tuple[dict, list[str]]:
    meta = store.table(["path", "label", "split"]).to_pylist()
    data = {
        s: (
            [r["path"] for r in meta if r["split"] == s],
            [r["label"] for r in meta if r["split"] == s],
        )
        for s in ("train", "val", "test")
    }
    return {s: (p, np.asarray(y)) for s, (p, y) in data.items()}, sorted({r["label"] for r in meta})


def test_layer_groups_cover_every_parameter_once_in_order(backbone) -> None:
    groups = layer_groups(backbone)
    flat = [n for g in groups for n in g]
    assert flat == [n for n, _ in backbone.model.named_parameters()]
    assert len(groups) == 6  # 5 stages of tf_efficientnet_lite0, then conv_head/bn2/classifier
    assert groups[0][0].startswith("conv_stem") and groups[-1][0].startswith("conv_head")
    assert any(n.startswith("blocks.3.") for n in groups[3])  # between stages: joins the later


def test_torchvision_resnet_groups_follow_its_layers(tmp_path) -> None:
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    bb = create_backbone("torchvision:resnet18", weights=weights, device="cpu")
    groups = layer_groups(bb)
    assert [g[-1].split(".")[0] for g in groups] == ["layer1", "layer2", "layer3", "layer4", "fc"]


def test_learning_rates_decay_with_depth_and_partial_trains_only_the_top(backbone) -> None:
    cfg = FineTuneSettings(strategy="partial", blocks=2, backbone_lr=1e-4, head_lr=1e-3)
    net = FineTuneNet(backbone, 4)
    groups = layer_groups(backbone)
    group_of = {n: i for i, g in enumerate(groups) for n in g}
    pg = param_groups(net, groups, group_of, trainable=2, cfg=cfg)
    lrs = {g["name"].split(".")[0]: g["lr"] for g in pg}
    assert lrs == {"head": 1e-3, "group5": 1e-4, "group4": pytest.approx(0.8e-4)}
    in_opt = {id(p) for g in pg for p in g["params"]}
    top = {id(p) for n, p in backbone.model.named_parameters() if group_of[n] >= 4}
    assert in_opt == top | {id(p) for p in net.head.parameters()}
    assert all(g["weight_decay"] == 0.0 for g in pg if g["name"].endswith(".nd"))


def test_gradual_unfreezing_adds_one_group_per_epoch() -> None:
    cfg = FineTuneSettings(strategy="full", gradual=True)
    assert [frozen_groups(cfg, e, 6, 6) for e in range(8)] == [6, 5, 4, 3, 2, 1, 0, 0]
    plain = FineTuneSettings(strategy="partial", blocks=2)
    assert frozen_groups(plain, 0, 6, 2) == 4


def test_bad_settings_are_refused_where_they_are_built() -> None:
    with pytest.raises(SettingsError, match=r"--strategy .* head, partial, full, not 'everything'"):
        FineTuneSettings(strategy="everything")
    with pytest.raises(SettingsError, match=r"--bn .* frozen, train, not 'sometimes'"):
        FineTuneSettings(bn="sometimes")
    with pytest.raises(SettingsError, match=r"--epochs .* at least 1, not 0"):
        FineTuneSettings(epochs=0)


def test_head_strategy_leaves_the_backbone_untouched(built_store, tmp_path) -> None:
    data, classes = _data(built_store)
    bb = create_backbone("efficientnet_lite0", device="cpu")
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    cfg = FineTuneSettings(strategy="head", epochs=1, **SMALL)
    out = finetune(bb, data, classes, cfg, tmp_path / "ft", progress=False, log=lambda _: None)
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert set(out.result.metrics) == set(METRICS) - {"top5_accuracy"}
    assert out.result.metrics["accuracy"] > 0.5  # 4 classes; warm-started from a probe


def test_files_that_no_longer_decode_are_skipped_and_recorded(built_store, tmp_path) -> None:
    data, classes = _data(built_store)
    copies = tmp_path / "copies"
    copies.mkdir()
    (train, ty), (test, sy) = data["train"], data["test"]
    corrupt, deleted = copies / f"corrupt{Path(train[0]).suffix}", copies / "deleted.png"
    corrupt.write_bytes(Path(train[0]).read_bytes()[:40])  # truncated after embedding
    deleted.write_bytes(Path(test[0]).read_bytes())
    deleted.unlink()  # deleted after embedding
    data["train"] = ([str(corrupt), *train[1:]], ty)
    data["test"] = ([str(deleted), *test[1:]], sy)
    cfg = FineTuneSettings(strategy="head", epochs=1, **SMALL)
    lines: list[str] = []
    bb = create_backbone("efficientnet_lite0", device="cpu")
    out = finetune(bb, data, classes, cfg, tmp_path / "ft", progress=False, log=lines.append)
    assert {(f["path"], f["split"]) for f in out.skipped} == {
        (str(corrupt), "train"),
        (str(deleted), "test"),
    }
    reasons = {f["split"]: f["reason"] for f in out.skipped}
    assert "corrupt" in reasons["train"] or "truncated" in reasons["train"], reasons
    assert "not found" in reasons["test"]
    assert any("skips 2 file(s)" in line for line in lines)
    assert out.result.confusion.sum() == len(test) - 1  # scored on what still decodes
    again = finetune(bb, data, classes, cfg, tmp_path / "ft", progress=False, log=lines.append)
    assert again.resumed_from_epoch == -1 and again.skipped == out.skipped
    assert again.result.metrics == out.result.metrics


def test_a_file_broken_during_training_names_itself(tmp_path) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(FineTuneError, match=r"x\.png became unreadable during fine-tuning"):
        LabelledImages([str(bad)], np.zeros(1, np.int64), lambda im: im, 32)[0]


def test_full_finetune_resumes_after_sigkill_and_becomes_a_backbone(built_store, tmp_path) -> None:
    data, classes = _data(built_store)
    cfg = FineTuneSettings(strategy="full", epochs=6, patience=10, **SMALL)
    workdir = tmp_path / "ft"
    script = f"""
import json, numpy as np
from extractors.embedding.backbones import create_backbone
from extractors.store.store import Store
from heads.finetune.run import finetune
from heads.settings import FineTuneSettings
from tests.heads.test_finetune import _data
data, classes = _data(Store({str(built_store.path)!r}))
cfg = FineTuneSettings(**json.loads({json.dumps(cfg.__dict__)!r}))
finetune(create_backbone("efficientnet_lite0", device="cpu"), data, classes, cfg,
         {str(workdir)!r}, progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    deadline = time.time() + 240
    while not (workdir / CHECKPOINT).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed mid-way"
    # A second run with the same settings while the first trains: refused, not interleaved.
    with pytest.raises(FineTuneError, match="another fine-tuning run with the same settings"):
        finetune(
            create_backbone("efficientnet_lite0", device="cpu"),
            data,
            classes,
            cfg,
            workdir,
            progress=False,
            log=lambda _: None,
        )
    assert proc.poll() is None, "the first run must still be training"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (workdir / CHECKPOINT).exists() and not (workdir / DONE).exists()

    logs: list[str] = []
    bb = create_backbone("efficientnet_lite0", device="cpu")
    out = finetune(bb, data, classes, cfg, workdir, progress=False, log=logs.append)
    assert out.resumed_from_epoch >= 1 and any("resuming" in line for line in logs)
    assert [h["epoch"] for h in out.history] == [float(e) for e in range(6)]
    assert (workdir / DONE).exists() and not (workdir / CHECKPOINT).exists()

    again = finetune(
        create_backbone("efficientnet_lite0", device="cpu"),
        data,
        classes,
        cfg,
        workdir,
        progress=False,
    )
    assert again.resumed_from_epoch == -1  # finished: reused, not retrained
    assert again.result.metrics == out.result.metrics

    # The saved network is a backbone: its classifier reproduces the run's test probabilities.
    tuned = create_backbone("finetuned:x", weights=workdir, device="cpu")
    assert tuned.name == "finetuned:x" and tuned.classes == classes
    assert tuned.preprocessing["input_size"] == [3, 32, 32]
    from extractors.embedding.images import load_rgb

    batch = torch.stack([tuned.transform(load_rgb(p)) for p in data["test"][0]])
    proba = tuned.predict_proba(batch).numpy()
    saved = np.asarray(json.loads((workdir / DONE).read_text())["test_proba"])
    assert np.allclose(proba, saved, atol=1e-4)
    assert tuned.embed(batch).shape == (len(batch), tuned.dim)


def test_unknown_finetuned_backbone_says_what_to_do(tmp_path) -> None:
    from extractors.embedding.backbones import BackboneError

    with pytest.raises(BackboneError, match="headstart finetune"):
        create_backbone("finetuned:nope", weights=tmp_path / "nope")
