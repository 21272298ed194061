"""Where things live in a workspace: stores (default one per source and backbone, else the
latest) and fine-tuned networks (`finetuned/<id>`), and the backbone a name stands for."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from extractors import DEFAULT_BACKBONE, DEFAULT_WORKSPACE
from extractors.embedding import finetuned
from extractors.store.layout import default_store_dir
from extractors.store.store import Store, StoreError

if TYPE_CHECKING:
    from extractors.embedding.backbones import Backbone


def resolve_store(
    store: str | Path | None,
    workspace: str | Path = DEFAULT_WORKSPACE,
    source: str | Path | None = None,
    backbone: str | None = None,
) -> Store:
    """An explicit --store; else the (source, backbone) default; else the latest store."""
    if store is not None:
        return Store(store)
    if source is not None:
        src_root = str(Path(source).expanduser().resolve())
        return Store(default_store_dir(workspace, src_root, backbone or DEFAULT_BACKBONE))
    stores = sorted(
        (p.parent for p in (Path(workspace) / "stores").glob("*/manifest.json")),
        key=lambda p: (p / "manifest.json").stat().st_mtime,
    )
    if not stores:
        raise StoreError(
            f"no store found under {Path(workspace) / 'stores'}; run `headstart embed SOURCE` "
            "(or `headstart demo`) first, or pass --store DIR"
        )
    return Store(stores[-1])


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
