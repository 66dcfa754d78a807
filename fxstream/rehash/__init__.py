"""Step Rehash: the schedules (:mod:`.schedule`, re-exported here) and the runtime (:mod:`.runtime`)."""
from .schedule import (Recording, StepRehash, default_cache_point, key_steps, record, similarity, temporal_layers,
                       with_cache_point)
from ..catalog import TEMPORAL_LAYERS

__all__ = ["StepRehash", "TEMPORAL_LAYERS", "temporal_layers", "default_cache_point", "key_steps", "similarity",
           "record", "Recording", "with_cache_point"]
