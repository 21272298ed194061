"""Commands that use a store: `search`, `audit`, `dedup`, `info`, `ui` (search page and JSON
API) and `map` (2-D embedding map)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.text import Text

from extractors import DEFAULT_WORKSPACE
from extractors.common import plural
from extractors.settings import SearchSettings
from flows.cli.app import app, out
from flows.cli.options import JsonOpt, StoreOpt, WideOpt, Workspace, with_settings
from flows.cli.render import DataTable, index_line, short_path, show


@app.command()
@with_settings(search=SearchSettings)
def search(
    search: SearchSettings,
    images: Annotated[
        list[str] | None,
        typer.Argument(
            help="Query images: one result list each (or, with --like/--unlike, examples of "
            "one query)."
        ),
    ] = None,
    like: Annotated[
        list[str] | None,
        typer.Option(
            "--like", help="More like this stored image: a row id or a path (repeatable)."
        ),
    ] = None,
    unlike: Annotated[
        list[str] | None,
        typer.Option(
            "--unlike", help="Less like this stored image: a row id or a path (repeatable)."
        ),
    ] = None,
    vector: Annotated[
        Path | None,
        typer.Option(help="Search by a vector: a .npy file, or a JSON list of numbers."),
    ] = None,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Find the images in a store most similar to IMAGES, to stored rows (--like, --unlike)
    or to a vector (cosine similarity of embeddings), filtered inside the index. --json gives
    what the search service's API answers: {"query": ..., "hits": [...]}, and
    {"results": [...]} for several images."""
    from flows.steps.inference import search_store

    results = search_store(
        [str(p) for p in images or []],
        like=like or [],
        unlike=unlike or [],
        vector=vector,
        search=search,
        store=store,
        workspace=workspace,
    )
    if as_json:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}, indent=2))
        return
    titles = _titles(images or [], like or [], unlike or [], vector)
    for answer, title in zip(results, titles, strict=True):
        table = DataTable(title=title, wide=wide)
        for col in ("rank", "score", "label", "split"):
            table.add_column(col, overflow="fold")
        table.add_column("id", no_wrap=True, spare=1)
        table.add_column("path", overflow="fold")
        for n, h in enumerate(answer["hits"], search.offset + 1):
            table.add_row(
                str(n), f"{h['score']:.4f}", str(h["label"]), str(h["split"]), h["id"],
                short_path(h["path"]),
            )  # fmt: skip
        show(table)


def _titles(
    images: list[str], like: list[str], unlike: list[str], vector: Path | None
) -> list[str]:
    if like or unlike or vector is not None:
        near = [*map(str, images), *like, *([str(vector)] if vector is not None else [])]
        less = f", less like {', '.join(unlike)}" if unlike else ""
        return [f"nearest to {', '.join(near)}{less}"]
    return [f"nearest to {p}" for p in images]


@app.command()
def audit(
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Write every finding to this .parquet or .csv file."),
    ] = None,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    threshold: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Cosine similarity of near-duplicates (as dedup)."),
    ] = 0.95,
    top: Annotated[int, typer.Option(min=0, help="Findings to print per issue kind.")] = 10,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rank a store's suspect images: wrong labels (cleanlab on out-of-sample probabilities of
    the best head kind), outliers (far from every other image) and near-duplicates.

    Each finding has path, id, label, split, issue (label, outlier or near_duplicate), score
    (higher = more suspect, comparable within a kind), suggested_label and related (the
    nearest neighbour or the near-duplicate's twin). See heads/audit.py for the protocol."""
    from extractors.workspace import resolve_store
    from flows.steps.audit import audit_store, keep_in_store, write_findings

    st = resolve_store(store, workspace, need="labels")
    table, summary = audit_store(st.path, threshold=threshold, progress=not as_json)
    keep_in_store(st.path, table, summary)  # the search page's issues view (`headstart ui`)
    if out_file is not None:
        summary["out"] = str(write_findings(table, out_file))
    if as_json:
        print(json.dumps({"summary": summary, "findings": table.to_pylist()}, indent=2))
        return
    counts = summary["issues"]
    out.print(
        Text(
            f"{summary['labelled_rows']} labelled of {plural(summary['rows'], 'image')}: "
            f"{plural(counts['label'], 'label issue')} (estimated label noise "
            f"{summary['label_noise_rate']:.1%}), {plural(counts['outlier'], 'outlier')}, "
            f"{plural(counts['near_duplicate'], 'near-duplicate')}; {summary['head']}"
        )
    )
    for kind in ("label", "outlier", "near_duplicate"):
        rows = [r for r in table.to_pylist() if r["issue"] == kind][:top]
        if not rows:
            continue
        t = DataTable(title=f"{kind} findings, most suspect first", wide=wide)
        for col in ("score", "label", "split", "suggested", "path"):
            t.add_column(col, overflow="fold")
        t.add_column("related", overflow="fold", spare=1)
        for r in rows:
            t.add_row(
                f"{r['score']:.3f}", str(r["label"]), str(r["split"]),
                str(r["suggested_label"] or ""), short_path(r["path"]),
                short_path(str(r["related"] or "")),
            )  # fmt: skip
        show(t)
    if "out" in summary:
        out.print(Text(f"all {plural(table.num_rows, 'finding')} -> {summary['out']}"))


@app.command()
def dedup(
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    threshold: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Cosine similarity at or above which two images count as near-duplicates: "
            "0.95 catches re-saved copies and most resized ones; lower values also group "
            "crops and edits (the split groups at 0.80, see --fix-splits).",
        ),
    ] = 0.95,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Write the groups to this .parquet or .csv file."),
    ] = None,
    fix_splits: Annotated[
        bool,
        typer.Option(
            "--fix-splits",
            help="Propose the moves that keep each near-duplicate group in one split (as the "
            "split of new stores groups them: the store's --split-threshold, 0.80 for older "
            "stores; test rows move out, never in), and list the trainings scored on the "
            "leaking split. Changes nothing without --apply.",
        ),
    ] = False,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply", help="With --fix-splits: make the moves (the next `run` retrains)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find groups of near-duplicate images in a store (before training: duplicates leak
    between train and test splits), and with --fix-splits put each group in one split.
    Exact duplicates are already in `headstart info`."""
    from extractors.store.dedup import leaks, near_duplicate_groups, write_groups
    from extractors.workspace import resolve_store

    st = resolve_store(store, workspace, need="labels")
    if apply and not fix_splits:
        raise typer.BadParameter("--apply makes the moves of --fix-splits: give both")
    if fix_splits:
        _fix_splits(st.path, workspace, apply, as_json)
        return
    groups = near_duplicate_groups(st, threshold=threshold)
    written = write_groups(groups, out_file) if out_file is not None else None
    rows = groups.to_pylist()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    n_groups = len({r["group"] for r in rows})
    table = DataTable(title=f"near-duplicates in {st.path.name} (cosine >= {threshold})")
    for col in ("group", "similarity", "label", "split", "path"):
        table.add_column(col, overflow="fold")
    for r in rows[:60]:
        table.add_row(
            str(r["group"]),
            f"{r['similarity']:.3f}",
            str(r["label"]),
            str(r["split"]),
            short_path(r["path"]),
        )
    if rows:
        out.print(table)
    leaky = leaks(groups)["leaky_groups"]
    out.print(
        f"{plural(n_groups, 'group')}, {plural(len(rows), 'image')}; "
        f"{plural(leaky, 'group')} {'spans' if leaky == 1 else 'span'} more than one split"
        + (f"; written to {written}" if written else "")
        + ("; `--fix-splits` proposes the moves that fix it" if leaky else "")
    )


def _fix_splits(store: Path, workspace: Path, apply: bool, as_json: bool) -> None:
    from flows.steps.audit import fix_splits

    result = fix_splits(store, workspace, apply=apply)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    moves = result["moves"]
    if result["note"]:
        out.print(escape(result["note"]), highlight=False)
    at = f"cosine >= {result['threshold']}"
    if not moves and result["too_large_to_keep"]:
        out.print(
            f"{plural(result['too_large_to_keep'], 'near-duplicate group')} ({at}) "
            f"{'spans' if result['too_large_to_keep'] == 1 else 'span'} splits, but "
            "each is too large to keep in one split (over a fifth of its class): nothing can "
            "be moved, and this split cannot be leak-free at this threshold",
            style="yellow",
            highlight=False,
        )
        return
    if not moves:
        out.print(f"no near-duplicate group ({at}) spans splits: nothing to move")
        return
    table = DataTable(title=f"moves that keep each group in one split ({len(moves)})")
    for col in ("group", "from", "to", "path"):
        table.add_column(col, overflow="fold")
    for m in moves[:60]:
        table.add_row(str(m["group"]), m["from"], m["to"], short_path(m["path"]))
    out.print(table)
    if len(moves) > 60:
        out.print(f"... and {len(moves) - 60} more (--json lists them all)")
    out.print(
        f"{plural(result['leaky_groups'], 'group')} "
        f"{'spans' if result['leaky_groups'] == 1 else 'span'} splits: "
        f"{plural(len(moves), 'move')}, {result['out_of_test']} of them out of the test split",
        highlight=False,
    )
    for r in result["runs_on_leaking_split"]:
        out.print(
            f"  scored on this leaking split: run {r['run_id']} ({escape(r['name'])}) {r['url']}",
            highlight=False,
        )
    if result["applied"]:
        old, new = result["fingerprint"]
        out.print(f"moved; fingerprint {old} -> {new}: the next `run` retrains the heads")
    else:
        out.print("nothing changed: add --apply to make these moves")


@app.command()
def info(
    store: StoreOpt = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: JsonOpt = False
) -> None:
    """Show what a store holds: backbone, rows, splits, classes, failures, index, heads."""
    from flows.steps.inference import store_info

    data = store_info(store, workspace)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    table = DataTable(title=f"store {data['store']}", show_header=False)
    for key in (
        "backbone",
        "weights",
        "dim",
        "rows",
        "labelled_rows",
        "splits",
        "classes",
        "failures",
        "fingerprint",
        "index_consistent",
        "created",
        "updated",
    ):
        table.add_row(key, str(data.get(key)))
    table.add_row("source", f"{data['source']['root']} ({data['source']['kind']})")
    grouped = data.get("split_groups") or {}
    if grouped:
        how = "row by row" if grouped["by"] == "none" else f"cosine >= {grouped['threshold']}"
        table.add_row(
            "split groups",
            f"{how}; last update: {plural(grouped.get('grouped_rows', 0), 'image')} in "
            f"{plural(grouped.get('groups', 0), 'group')}, "
            f"{grouped.get('joined', 0)} joined a group"
            + (f"; fixed: {grouped['fixed']['moved']} moved" if "fixed" in grouped else ""),
        )
    if data.get("index"):
        table.add_row("index", Text.from_markup(index_line(data["index"], "")))
        table.add_row("index history", data["index"]["history"][-1]["action"])
    if "heads" in data:
        table.add_row("best head", f"{data['heads']['best']} ({data['heads']['best_path']})")
    out.print(table)
    from extractors.store.layout import DUPLICATE

    for f in data["failures_table"][:20]:
        kind = "duplicate" if f["reason"].startswith(DUPLICATE) else "[yellow]failed[/]"
        out.print(f"  {kind} {escape(f['path'])}: {escape(f['reason'])}", highlight=False)


@app.command()
def ui(
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8765,
    mlflow_url: Annotated[
        str | None, typer.Option(help="MLflow UI address, to link rows to their runs.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Require this token of every request (default: none on loopback; a random "
            "one, printed, with any other --host)."
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Another host name the page is reached by on loopback (repeatable), e.g. a "
            "name in /etc/hosts; without --token, requests for any other name are refused."
        ),
    ] = None,
) -> None:
    """Search a store in the browser: drop an image, see its neighbours; plus an embedding map
    and a JSON API (/api/docs). Read-only: the index is memory-mapped, shared by processes;
    after an `embed` (or any commit) the next request answers from the new commit.

    On loopback (the default) it answers only requests addressed to loopback names, so no web
    page can reach it by re-pointing a domain to 127.0.0.1; with any other --host every
    request needs a token, printed at start (or --token)."""
    import secrets

    import uvicorn

    from flows.web.app import create_app
    from flows.web.memory import without_pandas
    from flows.web.security import LOOPBACK, is_loopback

    without_pandas()
    from extractors.workspace import resolve_store

    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    st = resolve_store(store, workspace)
    hosts = (*LOOPBACK, *(allow_host or ()))
    application = create_app(st.path, workspace, mlflow_url, hosts=hosts, token=token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    address = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    out.print(f"search page for {st.path} on {address} (Ctrl-C stops it)", highlight=False)
    if token and not is_loopback(host):
        out.print("open to the network: every request needs the token in that address")
    uvicorn.run(application, host=host, port=port, log_level="warning")


@app.command(name="map")
def map_cmd(
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    out_file: Annotated[
        Path,
        typer.Option(
            "--out", help="Where to write: NAME.png (plot) and NAME.html (interactive page)."
        ),
    ] = Path("embedding-map.png"),
    points: Annotated[int, typer.Option(min=2, help="Rows to sample for the map.")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed of the sample and of t-SNE.")] = 0,
) -> None:
    """Draw a 2-D map (t-SNE) of a store's embeddings, coloured by label: well-separated
    clusters mean the heads have an easy job; mixed ones show which classes get confused."""
    from extractors.workspace import resolve_store
    from flows.web.map import project, write_html, write_png

    st = resolve_store(store, workspace)
    data = project(st, max_points=points, seed=seed)
    png = write_png(data, out_file.with_suffix(".png"))
    html = write_html(data, out_file.with_suffix(".html"))
    out.print(f"{data['method']} map of {plural(len(data['points']), 'row')}: {png} and {html}")
