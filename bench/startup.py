"""Start-up benchmark: what a command costs as a whole process, against Python's own imports.

    uv run python bench/startup.py                  # 200 demo digits, 3 repeats, median
    uv run python bench/startup.py --images 400 --repeats 5

Every figure is the wall time of a fresh process (`headstart ...` or `python -c ...`), in a
fresh HOME with no Prefect server set up, divided by the floor measured in the same run:
`python -c "import torch, timm, faiss, pyarrow"`. Targets: `embed` of an unchanged folder
<= 1.5x the floor; `search`, `info` and `predict` of one image <= 1.3x. Also: the floor without
compiled bytecode (what every process pays where PYTHONDONTWRITEBYTECODE is set and none was
installed), a first `embed` (its embedding work reported by the run itself, the rest is
start-up), MLflow's first use (creating and migrating mlflow.db) against a later one, and
which heavy libraries each command imports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = "import torch, timm, faiss, pyarrow"
HEAVY = ("mlflow", "prefect", "skops", "sklearn", "timm")


def timed(cmd: list[str], env: dict[str, str], repeats: int = 1) -> tuple[float, str]:
    """Median wall seconds of `cmd` over `repeats` fresh processes, and its last stdout."""
    times, out = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        out = res.stdout
    return statistics.median(times), out


def imported(cmd: list[str], env: dict[str, str]) -> list[str]:
    """The heavy top-level packages a command imports (python -X importtime)."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", *cmd],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()}
    return [h for h in HEAVY if h in names]


def _uv_cache() -> str:
    res = subprocess.run(["uv", "cache", "dir"], capture_output=True, text=True)
    return res.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=200, help="demo digits in the folder (x10)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="headstart-startup-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"HOME": str(tmp / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
    (tmp / "home").mkdir()
    ws, py = str(tmp / "ws"), sys.executable
    cli = [py, "-m", "flows.cli"]
    sys.path.insert(0, str(ROOT))
    from flows.sample_data import materialise_digits

    folder = materialise_digits(tmp / "digits", per_class=max(3, args.images // 10))
    query = str(next(folder.glob("3/*.png")))

    floor, _ = timed([py, "-c", FLOOR], env, args.repeats)
    cold_env = env | {"PYTHONPYCACHEPREFIX": str(tmp / "no-pyc")}  # no bytecode to be found
    cold, _ = timed([py, "-c", FLOOR], cold_env, 1)

    first, out = timed([*cli, "embed", str(folder), "--workspace", ws, "--json"], env)
    report = json.loads(out)
    work = report["stats"]["seconds"]
    timed([*cli, "run", str(folder), "--workspace", ws, "--target", "0", "--json"], env)
    other = materialise_digits(tmp / "digits-2", per_class=max(3, args.images // 10))
    second, out = timed([*cli, "embed", str(other), "--workspace", ws, "--json"], env)
    work2 = json.loads(out)["stats"]["seconds"]

    store = ["--store", report["store"], "--workspace", ws]
    rows = {
        "embed, unchanged folder": [*cli, "embed", str(folder), *store],
        "search one image": [*cli, "search", query, *store],
        "info": [*cli, "info", *store],
        "predict one image": [*cli, "predict", query, *store],
    }
    targets = {"embed, unchanged folder": 1.5}
    db = tmp / "mlflow-first.db"
    mlflow_use = (
        f"import mlflow; mlflow.set_tracking_uri('sqlite:///{db}'); mlflow.search_experiments()"
    )
    mlflow_first, _ = timed([py, "-c", mlflow_use], env)
    mlflow_again, _ = timed([py, "-c", mlflow_use], env, args.repeats)

    print(f"{report['rows']} images, {args.repeats} repeats (median), fresh HOME, no Prefect")
    print(f"\n{'process':<34}{'seconds':>9}{'x floor':>9}{'target':>8}  imports")
    print(f"{'floor: ' + FLOOR:<34}{floor:>9.2f}{1:>9.2f}")
    print(f"{'floor without compiled bytecode':<34}{cold:>9.2f}{cold / floor:>9.2f}")
    for name, cmd in rows.items():
        seconds, _ = timed(cmd, env, args.repeats)
        target = targets.get(name, 1.3)
        heavy = ", ".join(imported(cmd[1:], env)) or "-"
        print(f"{name:<34}{seconds:>9.2f}{seconds / floor:>9.2f}{target:>8.1f}  {heavy}")
    print(
        f"{'first embed of ' + str(report['rows']) + ' images':<34}{first:>9.2f}"
        f"{first / floor:>9.2f}          embedding work {work:.2f} s, start-up and the rest "
        f"{first - work:.2f} s = {(first - work) / floor:.2f}x floor"
    )
    print(
        f"{'same, MLflow store already there':<34}{second:>9.2f}{second / floor:>9.2f}"
        f"          embedding work {work2:.2f} s, start-up and the rest "
        f"{second - work2:.2f} s = {(second - work2) / floor:.2f}x floor"
    )
    uv = shutil.which("uv")
    if uv:
        sync, _ = timed([uv, "run", "true"], env | {"UV_CACHE_DIR": _uv_cache()}, args.repeats)
        bare, _ = timed([uv, "run", "--no-sync", "true"], env, args.repeats)
        print(
            f"\n`uv run` itself: {sync:.2f} s ({sync / floor:.2f}x floor; no `compile-bytecode`, "
            f"which would re-check the whole environment each time: uv issue #12202), "
            f"--no-sync {bare:.2f} s"
        )
    print(
        f"\nMLflow first use (create + migrate mlflow.db): {mlflow_first:.2f} s; "
        f"a later use {mlflow_again:.2f} s; only commands that log pay either"
    )


if __name__ == "__main__":
    main()
