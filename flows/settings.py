"""Settings of the pipeline: one frozen object holding each stage's (embed, index, engine,
fine-tuning) and its own (heads, target, escalation, retraining). `run`, `serve`, the Prefect
flows and deployments.toml all take it whole."""

from __future__ import annotations

import dataclasses

from extractors.settings import (
    EmbedSettings,
    EngineSettings,
    IndexSettings,
    Settings,
    setting,
)
from heads.settings import HEAD_NAMES, FineTuneSettings

STAGES: tuple[type[Settings], ...] = (
    EmbedSettings,
    IndexSettings,
    EngineSettings,
    FineTuneSettings,
)


def _heads(names: list[str]) -> str | None:
    unknown = [h for h in names if h not in HEAD_NAMES]
    return f"takes {', '.join(HEAD_NAMES)}, not {', '.join(unknown)}" if unknown else None


@dataclasses.dataclass(frozen=True)
class PipelineSettings(Settings):
    """embed -> heads -> fine-tuning when the best head falls short: every setting of a run."""

    embed: EmbedSettings = dataclasses.field(default_factory=EmbedSettings)
    index: IndexSettings = dataclasses.field(default_factory=IndexSettings)
    engine: EngineSettings = dataclasses.field(default_factory=EngineSettings)
    finetune: FineTuneSettings = dataclasses.field(default_factory=FineTuneSettings)
    backbones: list[str] | None = setting(
        None,
        "Backbone (repeatable): efficientnet_lite0 (offline default), efficientnet_lite1, "
        "efficientnet_lite2, `torchvision:<model>`, `timm:<model>` or `finetuned:<id>`. Two or "
        "more are compared in one run: a store each, all on one split (the first's), the "
        "heads of each under one MLflow parent run, fine-tuning from the best when none "
        "reaches --target. Default: embed.backbone.",
        flags=("--backbone",),
    )
    shortlist: int | None = setting(
        None,
        "With several --backbone: train heads only on the N that LogME ranks best from their "
        "train embeddings (`headstart rank`), in seconds, before any head is fitted.",
        check=lambda v: None if v >= 1 else f"must be at least 1, not {v}",
    )
    heads: list[str] | None = setting(
        None,
        f"Head to train (repeatable): {', '.join(HEAD_NAMES)} (default: all of them).",
        flags=("--head",),
        check=_heads,
    )
    target: float | None = setting(
        0.9,
        "Validation score below which the run escalates to fine-tuning.",
        check=lambda v: None if v >= 0 else f"must be at least 0, not {v}",
    )
    always_finetune: bool = setting(
        False, "Escalate to fine-tuning regardless.", flags=("--finetune/--no-finetune",)
    )
    retrain: bool = setting(
        False,
        "Train the heads even when the data, heads and seed are those of the last training "
        "(by default that training's heads are reused).",
        flags=("--retrain/--no-retrain",),
    )
    audit: bool = setting(
        False,
        "Audit the data after training (wrong labels, outliers, near-duplicates: `headstart "
        "audit`) and log the findings to the run.",
        flags=("--audit/--no-audit",),
    )

    def check(self) -> None:
        many = self.backbones or []
        if len(set(many)) != len(many):
            self.fail("backbones", f"names each backbone once, not {', '.join(many)}")
        if len(many) > 1 and self.audit:
            self.fail(
                "audit",
                "audits one store: with several --backbone, run `headstart audit --store` on "
                "the store you keep",
            )

    def candidates(self) -> list[str | None]:
        """The backbones a run embeds with: `backbones`, else `embed.backbone` (None: the
        store's own, else the default)."""
        return list(self.backbones or [self.embed.backbone])
