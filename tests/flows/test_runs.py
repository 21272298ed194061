"""Which way the CLI runs: in-process, or as Prefect flows when a Prefect server is set up."""

from __future__ import annotations

import pytest

from flows import orchestration, runs


@pytest.fixture
def no_prefect_env(monkeypatch: pytest.MonkeyPatch, tmp_path):
    for var in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    return tmp_path / "prefect"


def test_no_server_set_up_means_in_process(no_prefect_env) -> None:
    assert orchestration.prefect_api_url() is None and not orchestration.using_prefect()
    with pytest.raises(orchestration.OrchestrationError, match="not set"):
        orchestration.check_prefect_server()


def test_the_environment_or_the_active_profile_names_the_server(
    no_prefect_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_prefect_env.mkdir()
    (no_prefect_env / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://team-server:4200/api"\n'
        '[profiles.other]\nPREFECT_API_URL = "http://other:4200/api"\n'
    )
    assert orchestration.prefect_api_url() == "http://team-server:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "other")
    assert orchestration.prefect_api_url() == "http://other:4200/api"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert (
        orchestration.prefect_api_url() == "http://127.0.0.1:9/api"
        and orchestration.using_prefect()
    )
    with pytest.raises(orchestration.OrchestrationError, match="no Prefect server answers"):
        orchestration.check_prefect_server(timeout_s=1)


def test_a_broken_profiles_file_is_no_server(no_prefect_env) -> None:
    no_prefect_env.mkdir()
    (no_prefect_env / "profiles.toml").write_text("this is [not toml")
    assert orchestration.prefect_api_url() is None


def test_nothing_new_means_no_change_at_all() -> None:
    assert runs.nothing_new({"embedded": 0, "removed": 0})
    assert not runs.nothing_new({"embedded": 1, "removed": 0})
    assert not runs.nothing_new({"embedded": 0, "removed": 2})


def test_without_a_prefect_server_the_cli_calls_the_run_itself(no_prefect_env) -> None:
    for run in (runs.embed, runs.train_heads, runs.pipeline, runs.finetune, runs.score):
        assert runs.for_cli(run) is run


def test_each_prefect_flow_takes_exactly_its_runs_parameters() -> None:
    """The flows of flows/pipeline.py are written out (a reader can grep them); this keeps
    their parameters, defaults and types those of the runs they call, and the deployable
    kinds those deployments.toml takes."""
    import inspect

    from flows import deployments, pipeline

    def params(fn):
        return [
            (p.name, p.kind, p.default, p.annotation)
            for p in inspect.signature(fn).parameters.values()
            if p.name != "runner"
        ]

    assert set(pipeline.FLOWS) == {
        runs.embed,
        runs.train_heads,
        runs.pipeline,
        runs.finetune,
        runs.score,
    }
    for run, flow in pipeline.FLOWS.items():
        assert params(flow.fn) == params(run), run.__name__
        assert flow.name == run.__name__.replace("_", "-")
        assert flow.description == run.__doc__
        assert pipeline.flow_of(run) is flow
    assert set(pipeline.DEPLOYABLE) == set(deployments.KINDS)
    assert all(pipeline.FLOWS[getattr(runs, k)] is f for k, f in pipeline.DEPLOYABLE.items())
