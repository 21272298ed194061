"""`serve`: the pipeline as scheduled Prefect deployments, from deployments.toml or from one
SOURCE with every setting `run` takes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from extractors import DEFAULT_WORKSPACE
from extractors.common import plural
from flows.cli.app import app, err, fail, out
from flows.cli.options import RUN, Experiment, StoreOpt, Workspace, with_settings
from flows.settings import PipelineSettings

if TYPE_CHECKING:
    from flows.deployments import DeploymentSpec


@app.command()
@with_settings(settings=RUN)
def serve(
    settings: PipelineSettings,
    source: Annotated[
        str | None,
        typer.Argument(help="Folder or manifest to re-process; omit to serve --file."),
    ] = None,
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule for SOURCE (default: hourly).")
    ] = None,
    interval: Annotated[
        float | None, typer.Option(help="Run SOURCE every this many seconds instead of cron.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name for SOURCE.")] = None,
    file: Annotated[
        Path,
        typer.Option(
            help="Deployments to serve when no SOURCE is given: one `deployment` table per "
            "source with name, source, cron or interval, store, workspace, experiment, the "
            "run settings (target, heads, ...) and [deployment.embed], [deployment.index], "
            '[deployment.engine] and [deployment.finetune] tables; `kind = "score"` for one '
            "that scores new images with the champion (see docs/operations.md)."
        ),
    ] = Path("deployments.toml"),
    limit: Annotated[
        int, typer.Option(help="Flow runs at once; a due run waits while one is running.")
    ] = 1,
    store: StoreOpt = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    experiment: Experiment = None,
) -> None:
    """Serve the pipeline (and scoring) as scheduled Prefect deployments until Ctrl-C.

    Each due run embeds only new or changed images, updates the index, retrains the heads only
    when the data changed, moves the champion only when a new model is better, and publishes
    its heads table as a Prefect artifact. A `score` deployment scores the new or changed
    images with the champion into a predictions table. Runs go to the
    Prefect API in PREFECT_API_URL (a standing `prefect server start`, see docs/operations.md) and
    MLflow in MLFLOW_TRACKING_URI. With a SOURCE, every option of `run` applies to its runs.
    """
    from extractors.embedding.sources import source_name
    from extractors.store.layout import absolute
    from flows import deployments

    if source is None:
        if cron or interval or name:
            raise deployments.DeploymentError(
                "--cron, --interval and --name apply to a SOURCE; with --file each "
                "deployment sets its own"
            )
        specs = deployments.read_file(file)
    else:
        locations = {"workspace": str(workspace.resolve())}
        if store is not None:
            locations["store"] = str(store.resolve())
        if experiment is not None:
            locations["experiment"] = experiment
        specs = [
            deployments.DeploymentSpec(
                name or f"pipeline-{source_name(source)}",
                absolute(source),
                cron or (None if interval else "0 * * * *"),  # both given: an error
                interval,
                settings,
                locations,
            )
        ]
    _check_sources(specs)
    _reach_prefect()
    _serve(deployments.build(specs), specs, limit)


def _check_sources(specs: list[DeploymentSpec]) -> None:
    """Every deployment's source, store and backbone, checked before anything is served."""
    from flows.steps.embedding import preflight

    for spec in specs:
        where = spec.locations
        for backbone in spec.settings.candidates():
            preflight(
                spec.source,
                where.get("store") and Path(where["store"]),
                backbone,
                Path(where.get("workspace", DEFAULT_WORKSPACE)),
                need_labels=True,
            )


def _reach_prefect() -> None:
    """The Prefect server set up, answering; else a temporary one, said so."""
    from flows import orchestration

    if orchestration.using_prefect():
        orchestration.check_prefect_server()
        return
    # Prefect's own 20 s is too short for a first start on a small, busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    err.print(
        "no Prefect server set up (PREFECT_API_URL): starting a temporary one, which can "
        "take a minute the first time; its runs vanish when serve stops. To keep them, run "
        "`uv run prefect server start` and export "
        "PREFECT_API_URL=http://127.0.0.1:4200/api first.",
        highlight=False,
        soft_wrap=True,  # the command it names stays one line: it copies and pastes whole
    )


def _serve(built: list[Any], specs: list[DeploymentSpec], limit: int) -> None:
    """Serve the deployments until Ctrl-C."""
    from prefect import serve as prefect_serve

    from flows import orchestration

    for spec in specs:
        out.print(
            f"serving pipeline/{spec.name} over {spec.source}, {spec.schedule}", highlight=False
        )
    if any(s.kind == "score" for s in specs):
        from flows.automations import drift_automations, stale

        for name in stale(specs):
            out.print(f"automation removed (no longer declared): {name}", highlight=False)
        for made in drift_automations(specs, built):
            out.print(f"automation: {made.name}", highlight=False)
    out.print(f"at most {plural(limit, 'run')} at once; Ctrl-C stops")
    try:
        prefect_serve(*built, limit=limit, print_starting_message=False)
    except RuntimeError as exc:
        if "ephemeral Prefect API" not in str(exc):
            raise
        raise fail(
            orchestration.OrchestrationError(
                "the temporary Prefect server did not start in time; start one with `uv run "
                "prefect server start`, export PREFECT_API_URL=http://127.0.0.1:4200/api and "
                "run serve again"
            )
        ) from None
