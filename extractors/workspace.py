"""Where things live in a workspace: stores (default one per source and backbone, else the
latest) and fine-tuned networks (`finetuned/<id>`), and the backbone a name stands for."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from extractors import DEFAULT_BACKBONE, DEFAULT_WORKSPACE
from extractors.embedding import finetuned
from extractors.store.layout import LATEST_HEADS, absolute, default_store_dir
from extractors.store.store import Store, StoreError

if TYPE_CHECKING:
    from extractors.embedding.backbones import Backbone


# What a command chose for the user when they did not say (the store of `--store`): one line
# each, which the CLI prints on stderr (flows/cli/app.py). A library user sees nothing.
defaults = logging.getLogger("headstart.defaults")
NEEDS = {
    "labels": ("labelled images", "run `headstart embed` on a labelled folder"),
    "heads": ("trained heads", "run `headstart train` on a labelled store"),
}


def resolve_store(
    store: str | Path | None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    source: str | Path | None = None,
    backbone: str | None = None,
    need: str | None = None,
) -> Store:
    """An explicit --store; else the (source, backbone) default; else the latest store that
    can serve the command (`need`: "labels" to train on, "heads" to predict with, None for
    any), said in one line."""
    if store is not None:
        return Store(store)
    if source is not None:
        src_root = absolute(source)  # a bucket's URL as it is: the same store from any folder
        return Store(default_store_dir(workspace, src_root, backbone or DEFAULT_BACKBONE))
    return latest_store(workspace, need)


def latest_store(workspace: str | Path = DEFAULT_WORKSPACE, need: str | None = None) -> Store:
    """The store updated last among those that have what `need` names (see `resolve_store`);
    a clear error naming what is missing when none has."""
    root = Path(workspace) / "stores"
    stores = sorted(
        (p.parent for p in root.glob("*/manifest.json")),
        key=lambda p: (p / "manifest.json").stat().st_mtime,
        reverse=True,
    )
    if not stores:
        raise StoreError(
            f"no store found under {root}; run `headstart embed SOURCE` "
            "(or `headstart demo`) first, or pass --store DIR"
        )
    what, how = NEEDS[need] if need else ("", "")
    for path in stores:
        st = Store(path)
        if need is None or _has(st, need):
            others = f" with {what}" if need else ""
            defaults.info(f"store: {path} (the latest{others} of {len(stores)}; --store picks)")
            return st
    raise StoreError(f"none of the {len(stores)} stores under {root} has {what}: {how}")


def _has(st: Store, need: str) -> bool:
    if need == "heads":
        return (st.path / LATEST_HEADS).is_file()
    try:
        return bool(st.manifest().get("labelled_rows"))
    except (OSError, ValueError, StoreError):
        return False


def backbone_for(
    name: str,
    workspace: str | Path = DEFAULT_WORKSPACE,
    weights: str | Path | None = None,
    device: str = "auto",
) -> Backbone:
    """create_backbone, with `finetuned:<id>` found in the workspace's finetuned/ folder."""
    from extractors.embedding.backbones import create_backbone  # torch: only where a network runs

    return create_backbone(name, weights=weights_file(name, workspace, weights), device=device)


def weights_file(
    name: str, workspace: str | Path = DEFAULT_WORKSPACE, weights: str | Path | None = None
) -> str | None:
    """The weights file a backbone loads: `weights`, or a fine-tuned one's in the workspace."""
    if name.startswith("finetuned:") and weights is None:
        weights = finetuned.folder_of(name.partition(":")[2], workspace)
    return None if weights is None else str(weights)
