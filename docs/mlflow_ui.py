"""The MLflow UI as an analyst meets it, driven in headless Chromium: open an experiment, expand
its newest parent run, select the nested runs (heads and fine-tuned networks), compare them.

    uv run python docs/mlflow_ui.py --tracking-uri sqlite:///$(pwd)/data/mlflow.db \
        --experiment digits --out docs

writes runs.png (the runs table, parent expanded) and compare.png (the comparison view) into
--out and prints what it saw as JSON. tests/flows/tracking/test_mlflow_ui.py runs the same `check`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from flows.tracking.tracker import experiment_page

RUN_NAME = "[col-id='attributes.`Run Name`']"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def check(tracking_uri: str, experiment: str, out: Path, chromium: str) -> dict[str, Any]:
    """Start `mlflow ui` on the store, drive it, save the screenshots; what the page showed."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(f"{base}/health", server)
        query = urllib.parse.quote(f"name = '{experiment}'")
        url = f"{base}/api/2.0/mlflow/experiments/search?max_results=10&filter={query}"
        with urllib.request.urlopen(url) as r:
            exp = json.loads(r.read())["experiments"][0]["experiment_id"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            try:
                return _drive(browser, base, exp, out)
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(30)


def _drive(browser: Any, base: str, exp: str, out: Path) -> dict[str, Any]:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(experiment_page(base, exp))  # the link headstart prints after each training
    try:
        page.wait_for_selector(f".ag-row {RUN_NAME}", timeout=60_000)
        opens_on = "runs"
    except PlaywrightTimeout:
        page.screenshot(path=str(out / "opened.png"))
        return {"opens_on": "something else (opened.png)"}
    dataset = page.inner_text(".ag-row [col-id='attributes.`Dataset`']").split("\n")[0]
    page.click(f".ag-row {RUN_NAME} button")  # expand the newest parent run
    page.wait_for_function(
        "sel => document.querySelectorAll(sel).length > 1", arg=f".ag-row {RUN_NAME}"
    )
    names = [c.inner_text().split("\n")[-1] for c in page.query_selector_all(f".ag-row {RUN_NAME}")]
    nested = page.query_selector_all(".ag-row .ag-selection-checkbox input")[1:]
    for box in nested:
        box.click()
    page.screenshot(path=str(out / "runs.png"))
    page.get_by_role("button", name="Compare").first.click()
    page.wait_for_selector("text=Run details", timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "compare.png"), full_page=True)
    text = page.inner_text("body")
    params = {
        line.split("\t")[0]: line.split("\t")[1:]
        for line in text.splitlines()
        if line.split("\t")[0] in ("backbone", "model", "feature")
    }
    return {
        "opens_on": opens_on,
        "dataset": dataset,
        "runs": names,
        "compared": len(nested),
        "title": next((t for t in text.splitlines() if t.startswith("Comparing")), ""),
        "params": params,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs a system Chromium (apt install chromium)")
    print(json.dumps(check(args.tracking_uri, args.experiment, args.out, chromium), indent=2))


if __name__ == "__main__":
    main()
