"""The documented commands run as written: every shell command of README.md and docs/*.md that
uses the demo's data runs here, in a fresh HOME, from a folder holding a demo workspace (as a
new user's repository root after `uv run headstart demo`). A command that no longer exists,
an option that is gone, or a command that fails is a red test, not a stale page.

How each line of a ```bash block is taken (one bash script per block, so variables carry):
- `uv run X` runs X from this environment (the user's `uv run` of the same lock);
- servers (`headstart ui`, `mlflow ui`, `mlflow models serve`) start in the background, and the
  block goes on once their port answers; a `curl` to the search service's port starts
  `headstart ui` first if the block did not; `curl` fails on an HTTP error;
- lines that need what only the user has (their own images `PATH/TO/...`, a database host, a
  team server, a secret), the suite itself, lint, benchmarks and Prefect servers are not run:
  their `headstart` command and options are checked against its `--help` instead.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
# Lines that need what a user has and a test does not, or that are not commands of headstart's
# data: checked (headstart's options), not run.
NOT_RUN = re.compile(
    r"PATH/TO|path/to/|<[a-z ]+>|:SECRET@|@db:|-host|scheduler:|createdb|apt-get|pip install|"
    r"uv run pytest|uv run ruff|bench/|prefect server start|headstart serve|mlflow server|"
    r"PREFECT_API_URL|PREFECT_SERVER_DATABASE|MLFLOW_TRACKING_URI=http"
)
SERVERS = {  # command -> default port
    "headstart ui": 8765,
    "mlflow ui": 5000,
    "mlflow models serve": 5000,
    "moto_server": 5000,  # a local S3-compatible server (docs/operations.md)
}
SERVICE_PORT = 8765
# What only the libraries print (log lines, warnings, registrations, telemetry), never ours.
NOISE = re.compile(
    r"^(INFO|WARNING|DEBUG)\b|^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d |\w+Warning: |Traceback|"
    r"Successfully registered|Created version|[Tt]elemetry|alembic",
    re.M,
)


def _blocks() -> list[tuple[str, list[str]]]:
    """(page:line, commands) of every bash block, continuation lines joined, comments off."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            body = m.group(1).replace("\\\n", " ")
            lines = [_strip_comment(line) for line in body.splitlines()]
            commands = [line for line in lines if line]
            if commands:
                where = f"{page.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
                found.append((where, commands))
    return found


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` outside quotes."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return line.strip()
    if not tokens:
        return ""
    cut = line.find(" #")
    return line[:cut].rstrip() if cut >= 0 and "#" not in " ".join(tokens) else line.strip()


BLOCKS = _blocks()


def test_the_pages_have_commands() -> None:
    assert len(BLOCKS) >= 10 and any("headstart demo" in " ".join(c) for _, c in BLOCKS)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A folder where `headstart demo` ran (a small one), and a new user's environment."""
    root = tmp_path_factory.mktemp("repo")
    home = tmp_path_factory.mktemp("home")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MLFLOW_", "HEADSTART_", "XDG_"))
    }
    env |= {"HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "COLUMNS": "100"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    demo = ["headstart", "demo", "--per-class", "24", "--epochs", "1"]
    res = subprocess.run(demo, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert not NOISE.search(res.stdout + res.stderr), NOISE.search(res.stdout + res.stderr)
    return root, env


def _help_of(command: list[str], env: dict[str, str]) -> str:
    res = subprocess.run(
        [*command, "--help"], env=env | {"COLUMNS": "300"}, capture_output=True, text=True
    )
    assert res.returncode == 0, f"{' '.join(command)} --help: {res.stderr[-500:]}"
    return res.stdout


def _check_options(line: str, env: dict[str, str]) -> None:
    """A headstart command that is not run: the command exists and takes every option used."""
    words = line.replace("uv run ", "").split()
    if "headstart" not in words:
        return
    i = words.index("headstart")
    if i + 1 >= len(words) or words[i + 1].startswith("-"):
        return
    text = _help_of(["headstart", words[i + 1]], env)
    for w in words[i + 2 :]:
        option = w.split("=")[0]
        if re.fullmatch(r"--[a-z][a-z-]*", option):
            assert option in text, f"`headstart {words[i + 1]}` has no option {option}: {line}"


def _script(commands: list[str], env: dict[str, str]) -> str:
    """The block as a bash script: servers in the background until their port answers."""
    lines = ["set -euo pipefail", "pids=()", "trap 'kill ${pids[@]:-} 2>/dev/null || true' EXIT"]
    lines.append(
        "wait_port() { for _ in $(seq 600); do "
        "curl -s -o /dev/null 127.0.0.1:$1 && return 0; sleep 0.2; done; "
        'echo "nothing answers on port $1"; return 1; }'
    )
    started: set[int] = set()
    for line in commands:
        if NOT_RUN.search(line):
            _check_options(line, env)
            continue
        run = re.sub(r"\buv run ", "", line)
        server = next((s for s in SERVERS if s in run), None)
        if server:
            port = re.search(r"(?:--port|-p)[ =](\d+)", run)
            port = int(port.group(1)) if port else SERVERS[server]
            lines += [f"( {run} ) > server-{port}.log 2>&1 &", "pids+=($!)", f"wait_port {port}"]
            started.add(port)
            continue
        if run.startswith("curl"):
            if f":{SERVICE_PORT}" in run and SERVICE_PORT not in started:
                lines += ["( headstart ui ) > server-ui.log 2>&1 &", "pids+=($!)"]
                lines.append(f"wait_port {SERVICE_PORT}")
                started.add(SERVICE_PORT)
            run = "curl --fail-with-body --max-time 120 " + run[len("curl ") :]
        lines.append(run)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where,commands", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_documented_commands_run_as_written(
    where: str, commands: list[str], demo_root: tuple[Path, dict[str, str]]
) -> None:
    root, env = demo_root
    if any(re.search(r"\bheadstart demo\b", c) for c in commands):
        commands = [c for c in commands if not re.search(r"\bheadstart demo\b", c)]
    script = _script(commands, env)
    res = subprocess.run(
        ["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in root.glob("server-*.log"))
    assert res.returncode == 0, (
        f"{where}: a documented command failed\n{script}\n--- stdout\n{res.stdout[-2000:]}"
        f"\n--- stderr\n{res.stderr[-3000:]}{logs}"
    )


def test_the_example_outputs_come_from_a_real_run(demo_root, tmp_path: Path) -> None:
    """docs/examples/ is written by docs/examples.py; here it runs every command after the
    demo, so a command it shows that fails or is gone is a red test."""
    root, env = demo_root
    script = ROOT / "docs" / "examples.py"
    res = subprocess.run(
        [sys.executable, str(script), "--root", str(root), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    shown = sorted(p.name for p in (ROOT / "docs" / "examples").glob("*.txt"))
    written = sorted(p.name for p in tmp_path.glob("*.txt"))
    assert set(written) == set(shown) - {"demo.txt"} and written
    for page in tmp_path.glob("*.txt"):
        first, _, rest = page.read_text().partition("\n")
        assert first.startswith("$ uv run headstart ") and rest.strip(), page.name
        assert not NOISE.search(rest), (page.name, NOISE.search(rest))  # only our own lines
