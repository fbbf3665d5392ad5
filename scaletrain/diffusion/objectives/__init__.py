"""The built-in objectives, one file each, found here by name: every module in this folder is
imported once and registers its ``Objective`` subclass with ``@register`` (as model families are
found in ``models/families/``). A new objective is a new file here; nothing else changes."""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
