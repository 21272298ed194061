"""The champion: the version of `<experiment>-image` that production scores with (the alias
`champion`), moved only when a new version is better, or by a person.

The rule (`consider`), for each new version:

1. no champion yet: the new version takes it;
2. fewer than half of the new version's test images were in the champion's test split (the
   data changed so much that the old split no longer exists): it takes it, and says so;
3. else, on the test images both were scored on (same content, same label), the new
   version's accuracy gain over the champion has a 95% paired-bootstrap interval
   (heads/evaluate.py:paired_gain); it takes `champion` only if the interval's lower end is
   above zero. An identical retrain (gain 0) never moves it.

Every decision is recorded as history: tags on the version and on its run (`champion_decision`,
`champion_reason`, `champion_by`, `champion_decided_at`: the last decision about that version),
and the registered model's `champion_history` (by whom, why, when), which `rollback` walks
back. `promote` and `rollback` are recorded the same way. What holds now never goes stale: the
alias, the model's `champion` tag (who, since when, why) and a `champion` tag, yes or no, on
each version and run the decisions touched (the old champion's turns to no when it loses).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from extractors.common import HeadstartError
from flows.tracking.models import TEST_TABLE as TABLE
from flows.tracking.store import connect, registry_lock

ALIAS = "champion"
HISTORY = "champion_history"
CURRENT = "champion"  # tag: "yes"/"no" on versions and runs, who and since when on the model
MIN_SHARED = 0.5  # of the new version's test images, for the old split to still count
KEEP = 30  # history entries kept


class ChampionError(HeadstartError, ValueError):
    """A promotion or rollback that cannot be done; the message says why."""


@dataclass
class Decision:
    """What `consider`, `promote` or `rollback` did."""

    name: str
    version: int
    promoted: bool
    reason: str
    previous: int | None = None
    gain: dict[str, float] = field(default_factory=dict)

    @property
    def champion(self) -> int | None:
        return self.version if self.promoted else self.previous

    def line(self) -> str:
        """One line for the output."""
        verb = "is now" if self.promoted else "stays"
        who = self.version if self.promoted else self.previous
        return f"champion: {self.name} version {who} {verb} champion ({self.reason})"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__) | {"champion": self.champion}


def current(name: str, workspace: str | Path) -> int | None:
    """The champion's version, or None."""
    connect(workspace, write=False)
    try:
        return int(MlflowClient().get_model_version_by_alias(name, ALIAS).version)
    except MlflowException:
        return None


def consider(name: str, version: int, workspace: str | Path, seed: int = 0) -> Decision:
    """Apply the rule (module docstring) to a new version and record the decision, holding
    the registry's lock (two trainings at once each compare against the champion then)."""
    connect(workspace)
    with registry_lock(workspace):
        return _consider(name, version, workspace, seed)


def _consider(name: str, version: int, workspace: str | Path, seed: int) -> Decision:
    old = current(name, workspace)
    if old is None:
        return _record(Decision(name, version, True, "no champion yet"), "rule")
    if old == version:
        return Decision(name, version, True, "already champion", old)
    new_t = _test_table(name, version)
    try:
        old_t = _test_table(name, old)
    except ChampionError as exc:
        return _record(Decision(name, version, False, str(exc), old), "rule")
    shared = _shared(new_t, old_t)
    if len(shared) < MIN_SHARED * len(new_t) or len(shared) == 0:
        why = (
            f"the data changed: {len(shared)} of its {len(new_t)} test images were in the "
            f"test split of version {old}, so that split no longer exists"
        )
        return _record(Decision(name, version, True, why, old), "rule")
    from heads.evaluate import paired_gain

    gain = paired_gain(shared["correct_new"], shared["correct_old"], seed=seed)
    facts = (
        f"accuracy {gain['new_accuracy']:.3f} vs {gain['old_accuracy']:.3f} of version {old} "
        f"on the same {int(gain['images'])} test images, gain {gain['gain']:+.3f}, 95% "
        f"interval [{gain['low']:+.3f}, {gain['high']:+.3f}]"
    )
    better = gain["low"] > 0
    why = f"{facts}: {'above' if better else 'not above'} the split's noise"
    return _record(Decision(name, version, better, why, old, gain), "rule")


def promote(name: str, version: int, workspace: str | Path, reason: str = "") -> Decision:
    """Make `version` the champion because a person says so; recorded as such. Only image
    models (`<experiment>-image`) have champions: `score` and `predict` take images."""
    connect(workspace)
    image_only(name)
    try:
        MlflowClient().get_model_version(name, str(version))
    except MlflowException:
        raise ChampionError(
            f"{name} has no version {version}; see its versions in the MLflow UI"
        ) from None
    with registry_lock(workspace):
        old = current(name, workspace)
        why = f"promoted by hand{': ' + reason if reason else ''}"
        return _record(Decision(name, version, True, why, old), "promote")


def image_only(name: str) -> None:
    """Refuse a registered model that is not an image model (`<experiment>-image`), such as
    the `<experiment>-head` models, which take embeddings: `score` could not use it."""
    from flows.tracking.image_model import image_name

    if name.endswith("-image"):
        return
    experiment = name.removesuffix("-head")
    raise ChampionError(
        f"{name} is not an image model: `score` and `predict` need one that takes images; "
        f"promote a version of {image_name(experiment)} instead (--model {image_name(experiment)})"
    )


def rollback(name: str, workspace: str | Path) -> Decision:
    """Give `champion` back to the version that held it before the current one (under the
    registry's lock); a version deleted since is refused by name, the champion unchanged."""
    connect(workspace)
    with registry_lock(workspace):
        now = current(name, workspace)
        if now is None:
            raise ChampionError(f"{name} has no champion to roll back")
        held = _holders(history(name, workspace))
        if len(held) < 2:
            raise ChampionError(
                f"{name} version {now} is its first champion: nothing to roll back to"
            )
        before = held[-2]
        try:
            MlflowClient().get_model_version(name, str(before))
        except MlflowException:
            raise ChampionError(
                f"{name} version {before}, the champion before version {now}, no longer "
                f"exists (deleted from the registry); version {now} stays champion. Choose "
                "another with `headstart promote VERSION`."
            ) from None
        why = f"rolled back from version {now}"
        return _record(Decision(name, before, True, why, now), "rollback")


def history(name: str, workspace: str | Path) -> list[dict[str, Any]]:
    """Every recorded decision, oldest first."""
    connect(workspace, write=False)
    try:
        tags = MlflowClient().get_registered_model(name).tags
    except MlflowException:
        raise ChampionError(f"no registered model {name!r}; train first") from None
    return json.loads(tags.get(HISTORY, "[]"))


def _holders(entries: list[dict[str, Any]]) -> list[int]:
    """The champions in the order they took over, each rollback undoing the last one."""
    held: list[int] = []
    for e in entries:
        if not e["promoted"]:
            continue
        if e["by"] == "rollback" and held:
            held.pop()
        if not held or held[-1] != e["version"]:
            held.append(e["version"])
    return held


def _record(decision: Decision, by: str) -> Decision:
    """Move the alias (if promoted), keep the `champion` yes/no tags true on every version and
    run it concerns, and append the decision to the history."""
    client = MlflowClient()
    name, version = decision.name, str(decision.version)
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if decision.promoted:
        client.set_registered_model_alias(name, ALIAS, version)
        if decision.previous is not None and decision.previous != decision.version:
            _tag(client, name, str(decision.previous), {CURRENT: "no"})
        _tag(client, name, version, {CURRENT: "yes"})
        client.set_registered_model_tag(
            name, CURRENT, f"version {version} since {at} ({by}: {decision.reason[:200]})"
        )
    elif decision.previous != decision.version:
        _tag(client, name, version, {CURRENT: "no"})
    _tag(
        client,
        name,
        version,
        {
            "champion_decision": "promoted" if decision.promoted else "kept",
            "champion_reason": decision.reason[:4000],
            "champion_by": by,
            "champion_decided_at": at,
        },
    )
    entries = json.loads(client.get_registered_model(name).tags.get(HISTORY, "[]"))
    entries.append(
        {
            "version": decision.version,
            "promoted": decision.promoted,
            "by": by,
            "reason": decision.reason[:300],
            "at": at,
        }
    )
    while len(json.dumps(entries)) > 4500 or len(entries) > KEEP:
        entries.pop(0)
    client.set_registered_model_tag(name, HISTORY, json.dumps(entries))
    return decision


def _tag(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    """`tags` on the version and, prefixed `headstart.`, on the run that logged it (unless
    that run was deleted since: the version's tags are what holds)."""
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return
    with contextlib.suppress(MlflowException):  # a deleted run takes no tags
        for k, v in tags.items():
            client.set_tag(run_id, f"headstart.{k}", v)


def _test_table(name: str, version: int) -> Any:
    """A version's test predictions (sha256, label, correct), from its run's table."""
    client = MlflowClient()
    run_id = client.get_model_version(name, str(version)).run_id
    try:
        experiment = client.get_run(run_id).info.experiment_id
        frame = client.load_table(experiment, TABLE, run_ids=[run_id])
    except MlflowException:
        raise ChampionError(
            f"{name} version {version} has no {TABLE} (logged before champions existed); "
            f"choose with `headstart promote VERSION`"
        ) from None
    return frame[["sha256", "label", "correct"]].drop_duplicates("sha256")


def _shared(new: Any, old: Any) -> Any:
    both = new.merge(old, on="sha256", suffixes=("_new", "_old"))
    both = both[both["label_new"] == both["label_old"]]
    both["correct_new"] = both["correct_new"].astype(bool).to_numpy(np.float64)
    both["correct_old"] = both["correct_old"].astype(bool).to_numpy(np.float64)
    return both
