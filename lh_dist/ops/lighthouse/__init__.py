"""Lighthouse attention: selection-based hierarchical attention for long-context training."""

from .api import lighthouse_attention, lighthouse_gather, lighthouse_scatter, lighthouse_select
from .layout import TILE_SELECT, Selection, gathered_length, level_offsets
from .params import BACKENDS, LighthouseParams, validate_lighthouse_inputs
from .reference import causal_attention, gather_pyramid, lighthouse_reference, pyramid_scores, scatter_back, select
from .scorers import SCORERS, get_scorer
