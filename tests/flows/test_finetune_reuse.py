"""A finished fine-tuning is reused by content: the same images in another folder (a copy)
reuse it in the same workspace, its test predictions given back at the copy's paths."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from flows.cli import app
from flows.tracking.models import TEST_TABLE

runner = CliRunner()
SMALL = [
    "--head",
    "logreg",
    "--epochs",
    "1",
    "--image-size",
    "32",
    "--no-flip",
    "--strategy",
    "head",
]


def _test_rows(run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return client.load_table(client.get_run(run_id).info.experiment_id, TEST_TABLE, [run_id])


def _ok(args: list[str]) -> dict:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads(res.stdout)


def test_a_copied_folder_reuses_the_finetuning_at_its_own_paths(
    prefect_server, mlflow_tmp, digits_dir, tmp_path
) -> None:
    ws = str(tmp_path / "ws")
    first = tmp_path / "first"
    shutil.copytree(digits_dir, first)
    one = _ok(["run", str(first), "--workspace", ws, "--finetune", "--json", *SMALL])
    assert one["finetune"]["reused"] is False
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    shutil.rmtree(first)  # the first folder's paths no longer exist
    two = _ok(["run", str(copy), "--workspace", ws, "--finetune", "--json", *SMALL])
    assert two["finetune"]["reused"] is True
    assert two["finetune"]["backbone"] == one["finetune"]["backbone"]
    assert two["finetune"]["accuracy"] == one["finetune"]["accuracy"]
    rows = _test_rows(two["finetune"]["run_id"])
    assert len(rows) > 0 and all(p.startswith(str(copy.resolve())) for p in rows["path"])
    first_rows = _test_rows(one["finetune"]["run_id"])
    assert sorted(rows["sha256"]) == sorted(first_rows["sha256"])
    assert rows["label"].notna().all()


def _refused(args: list[str]) -> str:
    """Run a command that must be refused: exit code 2 and one line, no traceback."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    return res.output


def test_damaged_or_foreign_weights_are_refused_in_one_line(digits_dir, tmp_path) -> None:
    """`--weights` that is not a safetensors file, or one that does not fit the network, and
    a fine-tuned network whose files are damaged: one line naming the file, exit code 2."""
    import torch
    from safetensors.torch import save_file

    ws = str(tmp_path / "ws")
    embed = ["embed", str(digits_dir), "--store", str(tmp_path / "s"), "--workspace", ws]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\xff" * 50)
    out = _refused([*embed, "--weights", str(bad)])
    assert f"cannot load {bad} as safetensors weights" in out
    foreign = tmp_path / "foreign.safetensors"
    save_file({"fc.weight": torch.zeros(2, 3)}, str(foreign))
    out = _refused([*embed, "--weights", str(foreign)])
    assert f"the weights in {foreign} do not fit" in out
    folder = tmp_path / "ws" / "finetuned" / "0123456789ab"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    out = _refused([*embed, "--backbone", "finetuned:0123456789ab"])
    assert f"cannot read the fine-tuned network in {folder}" in out
