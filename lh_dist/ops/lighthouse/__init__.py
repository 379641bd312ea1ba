"""Lighthouse attention: selection-based hierarchical attention for long-context training."""

from .layout import TILE_SELECT, Selection, gathered_length, level_offsets
from .params import BACKENDS, LighthouseParams, validate_lighthouse_inputs
from .scorers import SCORERS, get_scorer

# The names below come with the custom ops (api registers them, reference calls attention): they
# are imported on first use, so that importing the parameter rules (as the config does when it
# validates) registers no op.
_API = ("lighthouse_attention", "lighthouse_gather", "lighthouse_scatter", "lighthouse_select")
_REFERENCE = ("causal_attention", "gather_pyramid", "lighthouse_reference", "pyramid_scores", "scatter_back", "select")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _REFERENCE:
        from . import reference

        return getattr(reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "SCORERS", "TILE_SELECT", "LighthouseParams", "Selection", "gathered_length", "get_scorer",
           "level_offsets", "validate_lighthouse_inputs", *_API, *_REFERENCE]
