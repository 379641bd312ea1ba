"""Lighthouse attention: selection-based hierarchical attention for long-context training."""

from .api import lighthouse_attention
from .layout import Selection, gathered_length, level_offsets
from .reference import causal_attention, gather_pyramid, lighthouse_reference, pyramid_scores, scatter_back, select
from .scorers import SCORERS, get_scorer
from .validation import validate_lighthouse_args, validate_lighthouse_inputs
