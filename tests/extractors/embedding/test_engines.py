"""The Dask engine on a real local cluster of 2 worker processes: same store as the local
engine, and every image exactly once when a worker is SIGKILLed mid-run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from extractors.embedding.engines import DaskEngine, LocalEngine, make_engine
from extractors.embedding.sources import read_source
from extractors.settings import EmbedSettings, EngineSettings, SettingsError
from extractors.store.layout import EMBEDDINGS
from extractors.store.store import Store, StoreError
from flows.cli import app


def _same_store(a: Store, b: Store) -> None:
    """Same ids, same rows, embeddings equal within float tolerance."""
    ta, tb = a.table().sort_by("id"), b.table().sort_by("id")
    assert ta.num_rows == tb.num_rows
    assert len(set(tb["id"].to_pylist())) == tb.num_rows, "duplicate rows"
    meta = ["id", "path", "sha256", "label", "split", "width", "height"]
    assert ta.select(meta).equals(tb.select(meta))
    ea = np.stack(ta["embedding"].to_numpy(zero_copy_only=False))
    eb = np.stack(tb["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(ea, eb, atol=1e-4)
    assert b.verify() == []


def test_engine_settings_refuse_unknown_names_and_a_stray_address() -> None:
    embedding = EmbedSettings(batch_size=8, fast_decode=False)
    local = make_engine(EngineSettings(), embedding, progress=False)
    assert isinstance(local, LocalEngine) and local.settings is embedding
    dask = make_engine(EngineSettings(kind="dask", workers=3), embedding)
    assert isinstance(dask, DaskEngine) and (dask.workers, dask.batch_size) == (3, 8)
    assert dask.fast_decode is False
    with pytest.raises(SettingsError, match="must be one of local, dask, not 'ray'"):
        EngineSettings(kind="ray")
    with pytest.raises(SettingsError, match="--engine dask"):
        EngineSettings(address="tcp://127.0.0.1:8786")
    shards = DaskEngine(workers=2, batch_size=8).shards(list(range(100)))
    assert sum(map(len, shards)) == 100 and len(shards) == 8
    joined = DaskEngine(batch_size=8).shards(list(range(400)), workers=5)  # a bigger cluster
    assert sum(map(len, joined)) == 400 and len(joined) == 20


def test_embed_on_a_local_dask_cluster_equals_the_local_engine(
    prefect_server, mlflow_tmp, digits_dir, built_store, tmp_path, capfd
) -> None:
    store = tmp_path / "dask-store"
    args = ["embed", str(digits_dir), "--store", str(store), "--workspace", str(tmp_path)]
    res = CliRunner().invoke(app, [*args, "--engine", "dask", "--engine-workers", "2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # logs, and any logging errors, go to stderr
    assert report["engine"] == "dask" and report["embedded"] == 100
    _same_store(built_store, Store(store))
    assert not (store / "staging").exists()

    import mlflow

    run = mlflow.get_run(report["run_id"])
    assert run.data.params["engine"] == "dask"
    printed = capfd.readouterr().err  # the workers' own processes included
    assert "distributed." not in printed, printed[-2000:]


def test_killing_a_worker_mid_run_still_embeds_every_image_once(
    backbone, digits_dir, built_store, tmp_path
) -> None:
    from distributed import Client, LocalCluster

    store = Store(tmp_path / "store")
    staging = store.path / "staging"
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with Client(cluster) as client:  # closed before the engine joins with its own
            pids = sorted(client.run(os.getpid).values())
        killed: dict[str, int] = {}

        def kill_after_first_shard() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                done = list(staging.glob("shard-*.parquet")) if staging.exists() else []
                if done:
                    os.kill(pids[0], signal.SIGKILL)
                    killed["shards_done"] = len(done)
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_after_first_shard, daemon=True)
        watcher.start()
        engine = DaskEngine(
            address=cluster.scheduler_address, batch_size=8, shard_size=10, progress=False
        )
        report = store.update(read_source(digits_dir), backbone, engine=engine)
        watcher.join(timeout=5)
        assert killed, "the worker was not killed during the run"
        assert killed["shards_done"] < 10, "the kill came after the last shard"
        with Client(cluster) as client:
            assert pids[0] not in client.run(os.getpid).values()  # really dead, restarted
    assert report.rows == report.embedded == 100 and report.failed == 0
    _same_store(built_store, store)
    ids = pa.compute.unique(store.table(["id"])["id"])
    assert len(ids) == 100


class _LosingEngine(LocalEngine):
    """A local engine that never hands its last 3 files to the backbone: what a joined Dask
    cluster whose workers cannot see the staging folder did (their shards vanished)."""

    def __call__(self, staging_dir, backbone, pending, stats):
        return super().__call__(staging_dir, backbone, pending[:-3], stats)


def test_an_engine_that_loses_files_fails_loudly_and_commits_nothing(
    digits_dir, backbone, tmp_path
) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match=r"^3 file\(s\) were neither embedded nor recorded"):
        store.update(read_source(digits_dir), backbone, progress=False, engine=_LosingEngine())
    assert not (store.path / EMBEDDINGS).exists()  # nothing committed
    report = store.update(read_source(digits_dir), backbone, progress=False)
    assert report.rows == 100 and store.manifest()["rows"] == 100
