"""File and class names are data: markup, HTML, quotes, matplotlib math and non-ASCII in them
go through the whole pipeline and every command, printed as themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.slow

# Folder names cannot hold "/": Rich's opening tags, HTML that runs script, math text.
CLASSES = ["[red]x", "<img src=x onerror=alert(1)>", "x$^$y", "quo\"te's", "ĉaŭ 猫"]


def test_the_pipeline_and_every_command_take_hostile_names(tmp_path, mlflow_tmp) -> None:
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for c, label in enumerate(CLASSES):
        folder = root / label / "a["  # a folder `a[` holding `b].png`: Rich's `[/b]`
        folder.mkdir(parents=True)
        for i in range(5):
            arr = np.full((48, 48, 3), 40 * c, np.uint8) + rng.integers(
                0, 30, (48, 48, 3), np.uint8
            )
            name = "b].png" if i == 0 else f"[link=https:evil.example]{i}.png"
            Image.fromarray(arr).save(folder / name)
    ws = str(tmp_path / "ws")
    runner = CliRunner()

    def ok(*args: str) -> str:
        res = runner.invoke(app, [*args, "--workspace", ws], env={"COLUMNS": "300"})
        assert res.exit_code == 0, res.output + repr(res.exception)
        return res.stdout  # stderr says which store a command picked

    out = ok("run", str(root), "--target", "0", "--head", "logreg", "--head", "knn")
    assert "decision: no escalation" in out
    info = ok("info")
    assert "failed" not in info
    query = root / CLASSES[0] / "a[" / "b].png"
    found = ok("search", str(query), "-k", "3")
    assert "a[/b].png" in found and "[link=https:evil.example]" in found  # as themselves
    assert CLASSES[0] in found
    predicted = ok("predict", str(query))
    assert "[red]x" in predicted  # the class name, not red text
    hits = json.loads(ok("search", str(query), "-k", "1", "--json"))["hits"]
    assert hits[0]["label"] == CLASSES[0]
    ok("dedup")
    ok("map", "--out", str(tmp_path / "map.png"), "--points", "25")
    page = (tmp_path / "map.html").read_text()
    assert json.dumps(CLASSES[1])[1:-1] in page  # the label inside the page's JSON data
