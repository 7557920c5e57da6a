"""``Config(preset="llada-8b", field=value)``: a stage config that starts from a recipe's, with explicit changes.

The keyword is a constructor convenience, not a field: the recipe's stage config
(``pipelines/recipes.py``) gives every value, and the keyword arguments given replace exactly
those fields, whatever their values (``num_gpus_per_actor=0.0`` is CPU, ``warmup_steps=0`` is no
warmup). Without ``preset`` the class's own defaults (the tiny recipe) apply.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

logger = logging.getLogger(__name__)


def preset_keyword(stage: str):
    """Class decorator for the stage config called ``stage`` in a Recipe."""

    def wrap(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, preset: str | None = None, **kwargs):
            if preset is not None:
                from pipelines.recipes import get_recipe

                base = getattr(get_recipe(preset), stage)
                names = [f.name for f in dataclasses.fields(cls)]
                given = {**dict(zip(names, args)), **kwargs}
                kwargs = {**{name: getattr(base, name) for name in names}, **given}
                args = ()
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return wrap
