"""The init section: one start source at most; at launch, that it exists, holds a model of the
recipe's preset and (for DPO) was trained with the recipe's objective.

Part of the recipe checks (``scaletrain/checks.py`` gathers them): ``recipe(cfg, ctx)`` checks
the recipe as data (and the paths it names when ``ctx.check_paths``), and ``launch(cfg, ctx)`` what lies on disk; each failure is a
ValueError whose message is one line naming the key and the fix.
"""

from __future__ import annotations

from scaletrain.config import CheckContext, RunConfig


def recipe(cfg: RunConfig, ctx: CheckContext) -> None:
    if cfg.init.from_checkpoint and cfg.init.from_diffusers:
        raise ValueError("init.from_checkpoint and init.from_diffusers are both set; keep one of them")


def launch(cfg: RunConfig, ctx: CheckContext) -> None:
    if cfg.init.source is not None:
        from scaletrain.checkpoint.init import check_init_source

        check_init_source(cfg)
