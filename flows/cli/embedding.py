"""Commands of the embedding stage: `embed` (source -> store and index) and `index` (re-choose
or re-tune a store's index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from extractors import DEFAULT_WORKSPACE
from extractors.settings import EmbedSettings, EngineSettings, IndexSettings
from flows.cli.app import app, out
from flows.cli.options import JsonOpt, StoreOpt, Workspace, with_settings
from flows.cli.render import DataTable, index_line, print_embed

Source = Annotated[
    str,
    typer.Argument(
        help="Folder (one sub-folder per class, or unlabelled images) or a CSV/Parquet "
        "manifest with path,label[,split][,group] (rows of one group share a split)."
    ),
]


@app.command()
@with_settings(embedding=EmbedSettings, index=IndexSettings, engine=EngineSettings)
def embed(
    source: Source,
    embedding: EmbedSettings,
    index: IndexSettings,
    engine: EngineSettings,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: JsonOpt = False,
) -> None:
    """Embed new or changed images of SOURCE into the store and refresh its FAISS index.

    Safe to interrupt: finished batches are kept in the store's staging/ folder and a re-run
    continues from them. Files that cannot be embedded are listed in failures.parquet with a
    reason (`headstart info`). Counts and images/s per stage go to an MLflow run.
    """
    from flows import runs
    from flows.steps.embedding import preflight

    preflight(source, store, embedding.backbone, workspace, need_labels=False)
    report = runs.for_cli(runs.embed, workspace)(
        str(source),
        embedding=embedding,
        index=index,
        engine=engine,
        store=_s(store),
        workspace=str(workspace),
        progress=not as_json,
    )
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_embed(report)


@app.command(name="index")
@with_settings(index=IndexSettings)
def index_cmd(
    index: IndexSettings,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    rebuild: Annotated[
        bool, typer.Option(help="Retrain and re-tune from scratch instead of updating.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Choose, build and tune a store's search index (`embed` does this after each update).

    Use it to change the memory budget or recall target of an existing store. The choice,
    the reason, the tuned parameters and the recall/latency curve go to the manifest
    (`headstart info`)."""
    from extractors.workspace import resolve_store

    st = resolve_store(store, workspace)
    with st.lock():
        entry = st.reindex(index, rebuild=rebuild or index.given)
    if as_json:
        print(json.dumps(entry, indent=2))
        return
    out.print(index_line(entry), highlight=False)
    curve = DataTable(title="tuning on held-out queries (recall@10 vs exact search)")
    keys = [k for k in entry["tuning"]["curve"][0] if k not in ("recall", "ms_per_query")]
    for col in (*keys, "recall@10", "ms/query"):
        curve.add_column(col, justify="right")
    for row in entry["tuning"]["curve"]:
        chosen = all(row.get(k) == v for k, v in entry["tuning"]["params"].items())
        cells = [str(row[k]) for k in keys] + [f"{row['recall']:.3f}", f"{row['ms_per_query']:.3f}"]
        curve.add_row(*cells, style="bold green" if chosen and keys else None)
    if keys:
        out.print(curve)


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)
