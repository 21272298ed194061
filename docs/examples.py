"""Writes docs/examples/*.txt, the example outputs the docs show: each the real output of a
command, run in a fresh folder (as a new user's repository root) at 80 columns, right after a
real `headstart demo`. Never typed by hand: run this again when the output changes.

    uv run python docs/examples.py                 # the full demo, as a user runs it
    uv run python docs/examples.py --quick         # a small demo
    uv run python docs/examples.py --root DIR      # after the demo ran in DIR (tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = re.compile(r"^[^\n|]*:\s+\d+%\|.*\n?|^\n", re.M)  # a progress bar's line, blank lines
# (file name, the command as a user types it, after `uv run`); {image} is a sample digit.
COMMANDS = (
    ("demo", "headstart demo"),
    ("compare", "headstart compare"),
    ("champion", "headstart champion"),
    ("predict", "headstart predict {image}"),
    ("search", "headstart search {image} -k 5"),
    ("audit", "headstart audit --top 5"),
    ("info", "headstart info"),
)
QUICK = "headstart demo --per-class 24 --epochs 1"


def run(command: str, cwd: Path, env: dict[str, str]) -> tuple[str, float]:
    """The command's output as a terminal shows it (colours and progress bars off) and its
    wall time; a failure stops the script with the command's output."""
    t0 = time.perf_counter()
    res = subprocess.run(
        command.split(),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    took = time.perf_counter() - t0
    text = BAR.sub("", ANSI.sub("", res.stdout))  # stderr interleaved, as a terminal shows it
    if res.returncode != 0:
        sys.exit(f"`{command}` failed ({res.returncode}):\n{text[-3000:]}")
    return text, took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "examples", help="where the .txt go")
    ap.add_argument("--quick", action="store_true", help=f"`{QUICK}` instead of the full demo")
    ap.add_argument("--root", type=Path, help="a folder where the demo ran: the rest only")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env |= {"COLUMNS": "80", "NO_COLOR": "1", "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}
    env["TQDM_DISABLE"] = "1"  # progress bars are for a terminal, not a page
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headstart-examples-") as tmp:
        root = args.root.resolve() if args.root else Path(tmp)
        image = None
        for name, command in COMMANDS:
            if name == "demo" and args.root:
                continue
            if name == "demo" and args.quick:
                command = QUICK
            if image is None and name != "demo":
                image = next((root / "data/sample/digits/3").glob("*.png")).relative_to(root)
            command = command.format(image=image)
            text, took = run(command, root, env)
            page = f"$ uv run {command}\n{text.rstrip()}\n"
            (args.out / f"{name}.txt").write_text(page)
            print(f"{name}.txt: `{command}`, {took:.0f} s")


if __name__ == "__main__":
    main()
