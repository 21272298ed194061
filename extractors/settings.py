"""Settings of the embedding stages (embed, index, engine) and of a search: frozen objects,
each field declared once with its default, its help text and its check (`setting`).

The CLI builds its options from these fields (flows/cli/options.py), deployments.toml and the
Prefect flows build the objects from plain dicts (`Settings.from_dict`), tests from code. A bad
value is refused where the object is built, with one line that names the setting. Nothing
heavy is imported here: the CLI reads these classes before it imports torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

from extractors.common import HeadstartError
from extractors.search.filters import CLI_K, Filters, Page, sentence

if TYPE_CHECKING:
    from extractors.store.grouping import Grouping

ENGINES = ("local", "dask")
INDEX_KINDS = ("flat", "hnsw", "ivf_flat", "ivf_pq")
DEFAULT_RECALL = 0.95  # recall@10 an index is tuned to unless asked otherwise
GROUP_THRESHOLD = 0.80  # cosine that makes two images one group of the split (grouping.py)
Check = Callable[[Any], str | None]  # a message when the value is wrong, else None


class SettingsError(HeadstartError, ValueError):
    """A setting with a value it cannot take; the message names it and says what it takes."""


def setting(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    check: Check | None = None,
    choices: tuple[Any, ...] | None = None,
    cli: tuple[Any, Callable[[Any], Any]] | None = None,
) -> Any:
    """A settings field: its default, the help the CLI and the Prefect UI show, its command
    line flags (default `--field-name`), and its check. `cli` is (option type, parser) where
    the command line spells the value differently (a comma-separated list)."""
    meta = {"help": help, "flags": flags, "check": check, "choices": choices, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def at_least(low: int | float) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}, not {v}"


def in_range(low: float, high: float) -> Check:
    return lambda v: None if low < v <= high else f"must be in ({low}, {high}], not {v}"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of the settings objects: types and checks enforced on construction."""

    section: ClassVar[str] = ""  # the table name in deployments.toml, the group in --help

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _conform(getattr(self, f.name), hints[f.name], self.describe(f.name))
            object.__setattr__(self, f.name, value)
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if value is not None and choices and value not in choices:
                self.fail(f.name, f"must be one of {', '.join(map(str, choices))}, not {value!r}")
            if value is not None and check and (message := check(value)):
                self.fail(f.name, message)
        self.check()

    def check(self) -> None:
        """Checks across fields; a subclass raises SettingsError via `fail`."""

    @classmethod
    def describe(cls, name: str) -> str:
        """How a user spells the setting: its flag and its deployments.toml key."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        if "help" not in f.metadata:  # a stage's settings inside the pipeline's
            return f"[{name}]"
        flag = (f.metadata.get("flags") or (f"--{name.replace('_', '-')}",))[0].split("/")[0]
        key = f"{cls.section}.{name}" if cls.section else name
        return f"{flag} ({key})"

    @classmethod
    def fail(cls, name: str, message: str) -> typing.NoReturn:
        raise SettingsError(f"{cls.describe(name)} {message}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Self:
        """The settings from plain values (TOML, JSON, a Prefect form); unknown keys refused."""
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            where = f"[{cls.section}] " if cls.section else ""
            raise SettingsError(
                f"{where}unknown setting(s) {', '.join(unknown)}; it takes {', '.join(names)}"
            )
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (nested settings as dicts): what MLflow, JSON and Prefect store."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def _conform(value: Any, hint: Any, name: str) -> Any:
    """`value` as a `hint` (int widened to float, a dict to its settings, a sequence to a
    list), or SettingsError naming the setting and the type it takes."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        origin = typing.get_origin(t) or t
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool) and type(value) is origin:
            return value
        if origin is list and isinstance(value, list | tuple):
            (item,) = typing.get_args(t) or (Any,)
            return [_conform(v, item, name) for v in value]
        if origin is tuple and isinstance(value, list | tuple):  # tuple[X, ...]
            item = (typing.get_args(t) or (Any,))[0]
            return tuple(_conform(v, item, name) for v in value)
        if isinstance(origin, type) and issubclass(origin, Settings):
            if isinstance(value, origin):
                return value
            if isinstance(value, Mapping):
                return origin.from_dict(value)
        if t is Any:
            return value
    wanted = " or ".join(_type_name(t) for t in options)
    raise SettingsError(f"{name} must be {wanted}, not {value!r}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(t: Any) -> str:
    if t is type(None):
        return "unset"
    if typing.get_origin(t) in (list, tuple):
        return f"a list of {_type_name(typing.get_args(t)[0])}"
    if isinstance(t, type) and issubclass(t, Settings):
        return "a table"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(t, getattr(t, "__name__", str(t)))


def _layers(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def _size(text: str) -> str | None:
    from extractors.common import parse_bytes

    try:
        parse_bytes(text)
    except ValueError:
        return f"must be a size such as 512MB or 2GB, not {text!r}"
    return None


def _device(text: str) -> str | None:
    ok = text in ("auto", "cpu", "mps") or text == "cuda" or text.startswith("cuda:")
    return None if ok else f"must be auto, cpu, cuda, cuda:N or mps, not {text!r}"


@dataclasses.dataclass(frozen=True)
class EmbedSettings(Settings):
    """How images become embeddings: which network, which layers, how they are decoded."""

    section: ClassVar[str] = "embed"

    backbone: str | None = setting(
        None,
        "Backbone: efficientnet_lite0 (offline default), `torchvision:<model>` (e.g. "
        "torchvision:resnet50) or `timm:<model>` (e.g. timm:convnext_tiny.fb_in1k). Default: "
        "the store's own, else efficientnet_lite0.",
    )
    weights: str | None = setting(
        None, "Local weights file for the backbone instead of a download.", cli=(Any, str)
    )
    split_from: str | None = setting(
        None,
        "A store whose split the images take (matched by path; the images it lacks are split "
        "as usual), so the stores of several backbones hold one split: a run with several "
        "--backbone sets it.",
        cli=(Any, str),
    )
    layers: list[str] | None = setting(
        None,
        "Also save pooled features of these layers as extra columns, comma-separated: stage "
        "indices (-1 = last stage, -2 = the one before) or module names, e.g. --layers=-2,-1. "
        "Heads then pick the best column on validation. Default: the store's own (none for a "
        "new store).",
        cli=(str | None, _layers),
    )
    batch_size: int = setting(32, "Images per forward pass.", check=at_least(1))
    decode_threads: int | None = setting(
        None,
        "Decode threads, working ahead of the model (default: cores, 2-16).",
        flags=("--decode-threads", "--workers"),
        check=at_least(0),
    )
    fast_decode: bool = setting(
        True,
        "Decode large JPEGs at 1/2, 1/4 or 1/8 scale (never below the size the model resizes "
        "to); --no-fast-decode decodes every pixel first.",
        flags=("--fast-decode/--no-fast-decode",),
    )
    compile: bool | None = setting(
        None,
        "Run the network as an ahead-of-time compiled package (weights frozen, ops fused: "
        "about 1.5x the model on CPU). By default it is used when an earlier run built it, and "
        "built when the job is large enough to repay the ~30 s it takes (3,000 images on CPU); "
        "--compile builds it now, --no-compile never uses it. Needs a C++ compiler; where "
        "compiling fails the run warns and goes on as usual.",
        flags=("--compile/--no-compile",),
    )
    device: str = setting(
        "auto",
        "Where the network runs: auto (a GPU when there is one), cpu, cuda, cuda:N.",
        check=_device,
    )
    seed: int = setting(
        0, "Seed of the stratified train/val/test split (and of the heads trained on it)."
    )
    split_groups: str = setting(
        "near-duplicates",
        "How the split keeps images together: near-duplicates (each group of near-duplicate "
        "images, and each `group` of a manifest, goes to one split, so no test image has a "
        "near-twin in train) or none (row by row). Rows already in the store keep their "
        "splits; new rows that join their groups take them.",
        choices=("near-duplicates", "none"),
    )
    split_threshold: float = setting(
        GROUP_THRESHOLD,
        "Cosine similarity at or above which two images count as near-duplicates for the "
        "split (measured in bench/grouping.py: re-encoded, resized copies of a photo score "
        "0.70-1.00, different photos at most 0.58).",
        check=in_range(0.0, 1.0),
    )

    def grouping(self) -> Grouping:
        """The group-aware split these settings ask for."""
        from extractors.store.grouping import Grouping

        return Grouping(self.split_groups, self.split_threshold)


@dataclasses.dataclass(frozen=True)
class IndexSettings(Settings):
    """What the user asks of the search index; unset fields keep the store's own (saved in its
    manifest), else the defaults. `resolved` fills them in."""

    section: ClassVar[str] = "index"

    max_memory: str | None = setting(
        None,
        "Memory budget of the search index, e.g. 512MB or 8GB (default: the store's, else "
        "4GB). It picks the index: exact below 20,000 images, HNSW when it fits, else IVF, "
        "else IVF-PQ codes with exact re-ranking from disk.",
        check=_size,
        cli=(str | None, lambda v: v),
    )
    recall: float | None = setting(
        None,
        "Recall@10 the index is tuned to, measured against exact search on held-out queries "
        "(default: the store's, else 0.95).",
        check=in_range(0, 1),
    )
    kind: str | None = setting(
        None,
        "Force an index kind: auto (default), flat, hnsw, ivf_flat or ivf_pq.",
        flags=("--index",),
        choices=("auto", *INDEX_KINDS),
    )

    @property
    def given(self) -> bool:
        """Whether anything was asked (else the store's index settings stand)."""
        return any(v is not None for v in dataclasses.asdict(self).values())

    def resolved(self, entry: Mapping[str, Any] | None = None) -> IndexSettings:
        """These settings over a manifest index entry's saved ones, over the defaults."""
        saved = dict((entry or {}).get("settings") or {})
        mine = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        merged = {**{k: v for k, v in saved.items() if v is not None}, **mine}
        if isinstance(merged.get("max_memory"), int):
            merged["max_memory"] = str(merged["max_memory"])  # older manifests: plain bytes
        return IndexSettings(
            max_memory=merged.get("max_memory"),
            recall=merged.get("recall", DEFAULT_RECALL),
            kind=merged.get("kind", "auto"),
        )


@dataclasses.dataclass(frozen=True)
class EngineSettings(Settings):
    """Where the new images are embedded: in this process, or sharded over a Dask cluster."""

    section: ClassVar[str] = "engine"

    kind: str = setting(
        "local",
        "local (this process) or dask: shard the new images over a Dask cluster, a local one "
        "of --engine-workers processes unless --scheduler names one. Workers read the images "
        "and send back the rows; only this process writes the store.",
        flags=("--engine",),
        choices=ENGINES,
    )
    address: str | None = setting(
        None,
        "Dask scheduler to join (tcp://host:8786) with --engine dask. Its workers must reach "
        "the images (the same local paths, or the bucket), not the store.",
        flags=("--scheduler", "--address"),
    )
    workers: int | None = setting(
        None,
        "Worker processes of the local Dask cluster (default: one per GPU, else 2).",
        flags=("--engine-workers",),
        check=at_least(1),
    )

    def check(self) -> None:
        if self.address and self.kind != "dask":
            self.fail("address", 'joins a Dask cluster; add --engine dask (kind = "dask")')


MAX_ROW_ID = 2**63 - 1  # row ids are the first 63 bits of a hash (extractors/store/layout.py)


def _ids(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(i) for i in str(text).split(",") if i.strip())
    except ValueError:
        raise SettingsError(f"--ids takes row ids, comma-separated, not {text!r}") from None


def _row_ids(ids: tuple[int, ...]) -> str | None:
    bad = next((i for i in ids if not 0 <= i <= MAX_ROW_ID), None)
    return None if bad is None else f"takes row ids from 0 to 2**63 - 1, not {bad}"


@dataclasses.dataclass(frozen=True)
class SearchSettings(Settings):
    """Which results a search returns: how many, from which rank, among which rows (the
    filters apply inside the index). Helps and defaults: extractors/search/filters.py (`k`:
    its CLI_K)."""

    section: ClassVar[str] = "search"

    k: int = setting(CLI_K, sentence(Page, "k"), flags=("-k",), check=at_least(1))
    offset: int = setting(Page.offset, sentence(Page, "offset"), check=at_least(0))
    label: str | None = setting(None, sentence(Filters, "label"))
    split: str | None = setting(None, sentence(Filters, "split"))
    ids: tuple[int, ...] | None = setting(
        None, sentence(Filters, "ids"), check=_row_ids, cli=(str | None, _ids)
    )
    path_prefix: str | None = setting(None, sentence(Filters, "path_prefix"))


@dataclasses.dataclass(frozen=True)
class MonitorSettings(Settings):
    """Thresholds of the drift and out-of-distribution checks of a scoring run
    (extractors/monitor/). Each batch test alarms when its p-value is below drift_alpha and
    its effect reaches its floor: at most 4 x drift_alpha (0.4%) of in-distribution batches
    alarm (bench/monitor.py measures it)."""

    section: ClassVar[str] = "monitor"

    ood_k: int = setting(10, "Neighbour whose distance is an image's OOD score.", check=at_least(1))
    ood_level: float = setting(
        0.01,
        "Flag an image out of distribution when its conformal p-value is at most this: the "
        "share of in-distribution images flagged (needs 1/level - 1 val images).",
        check=in_range(0.0, 0.5),
    )
    drift_alpha: float = setting(
        0.001, "p-value below which a batch test alarms.", check=in_range(0.0, 0.5)
    )
    drift_rows: int = setting(
        500, "Rows per side of the embedding two-sample test (bounds its cost).", check=at_least(10)
    )
    drift_permutations: int = setting(
        1999, "Permutations of the embedding two-sample test.", check=at_least(99)
    )
    min_drift_auc: float = setting(
        0.55,
        "Embedding drift alarms only from this witness AUC (0.5: no difference).",
        check=in_range(0.5, 1.0),
    )
    min_ood_ratio: float = setting(
        2.0, "The OOD share alarms only from this many times the level.", check=at_least(1.0)
    )
    min_class_shift: float = setting(
        0.1,
        "Prediction drift alarms only from this total variation distance between predicted "
        "and training class shares.",
        check=in_range(0.0, 1.0),
    )
    min_confidence_drop: float = setting(
        0.05, "The mean top probability alarms only from this drop.", check=in_range(0.0, 1.0)
    )
    seed: int = setting(0, "Seed of the subsampling, permutations and Monte-Carlo draws.")

    def check(self) -> None:
        if 1.0 / (self.drift_permutations + 1) >= self.drift_alpha:
            least = 1 / self.drift_alpha - 1
            self.fail("drift_permutations", f"must exceed 1/drift_alpha - 1 = {least:g}")
