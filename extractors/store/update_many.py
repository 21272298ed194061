"""Several stores of one source, each with its own backbone, in one pass over the images
(`headstart run SOURCE --backbone A --backbone B`): every store's lock held (in a fixed order),
each store planned as `update` plans it, the union of the files any store needs read and
decoded once (extractors/embedding/multi.py; a backbone gets only the files its store needs),
then each store committed as `update` commits it (extractors/store/update.py). Local engine
only: `--engine dask` updates the stores one by one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

from extractors.embedding.sources import Source
from extractors.settings import IndexSettings
from extractors.store.grouping import Grouping
from extractors.store.plan import UpdatePlan
from extractors.store.store import Store, StoreError, UpdateReport
from extractors.store.update import Underway, begin_update, commit_update, disk_error

if TYPE_CHECKING:
    from extractors.embedding.backbones import Backbone
    from extractors.embedding.engines import LocalEngine

# The source a store commits with, asked just before its commit (the stores before it are
# committed by then): how a later store takes the first store's split.
CommitSource = Callable[[Store, Source], Source]


def update_many(
    jobs: Sequence[tuple[Store, Backbone]],
    source: Source,
    seed: int = 0,
    engine: LocalEngine | None = None,
    index: IndexSettings | None = None,
    grouping: Grouping | None = None,
    commit_source: CommitSource | None = None,
) -> list[UpdateReport]:
    """Bring each store in line with `source`, embedded by its backbone, as `Store.update`
    would one after another (the same rows, splits, failures, index and manifest; the
    commits in the order given), but reading and decoding each image file once for all of
    them. `commit_source` (if given) gives the source each store commits with (same files,
    labels or splits may differ). Returns a report per store, in the order given."""
    from extractors.embedding.engines import LocalEngine  # torch: only where rows are embedded

    engine = engine or LocalEngine()
    paths = [st.path.resolve() for st, _ in jobs]
    if len(set(paths)) != len(paths):
        raise StoreError("update_many: each store may be given once (one backbone a store)")
    with ExitStack() as locks:
        for k in sorted(range(len(jobs)), key=lambda k: str(paths[k])):  # one order: no deadlock
            locks.enter_context(jobs[k][0].lock())
        for store, backbone in jobs:
            store.check_backbone(backbone.name, backbone.weights)
            store.check_layers(backbone.layer_dims)
        try:
            runs: list[Underway] = []
            hashed: dict[str, tuple[str, int, int]] = {}  # each file hashed once, too
            for store, backbone in jobs:
                runs.append(begin_update(store, source, backbone, hashed))
                plan = runs[-1].plan
                hashed |= {p: (sha, *plan.stat[p]) for p, sha in plan.sha.items()}
            _embed(runs, engine)
            reports = []
            for run in runs:
                src = commit_source(run.store, source) if commit_source else source
                _refresh(run.plan, src)
                reports.append(commit_update(run, src, seed, index, grouping or Grouping()))
            return reports
        except OSError as exc:
            raise disk_error(", ".join(str(st.path) for st, _ in jobs), exc) from exc


def _embed(runs: list[Underway], engine: LocalEngine) -> None:
    """The files each store's plan needs, from one decode of each; failures to each report."""
    from extractors.embedding.multi import embed_into_staging

    todo = [r for r in runs if r.plan.to_embed]
    if not todo:
        return
    jobs = [(r.staging.folder, r.backbone, r.plan.pending()) for r in todo]
    failures = embed_into_staging(engine, jobs, [r.stats for r in todo])
    for run, failed in zip(todo, failures, strict=True):
        run.report.failures.extend(failed)


def _refresh(plan: UpdatePlan, source: Source) -> None:
    """The labels and given splits of the plan's rows as `source` gives them (what planning
    with `source` would have recorded: which files to keep or embed does not depend on them)."""
    given = {r.path: (r.label, r.split) for r in source.records}
    for rows in (plan.keep, plan.staged):
        for path in rows:
            if path in given:
                rows[path] = given[path]
    plan.to_embed = [
        dataclasses.replace(r, label=given[r.path][0], split=given[r.path][1])
        if r.path in given
        else r
        for r in plan.to_embed
    ]
