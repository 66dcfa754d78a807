"""The one protocol every grouped region's module follows: what the planner, budget, report, drawing and runtime
may ask of it.

NOTE [One region model]
A region the compiler groups, whatever made it (the Feature Slicer's cut regions, ``passes/group_regions.py``;
halo regions, ``passes/halo_regions.py``), becomes one ``call_module`` node whose module is a
:class:`RegionLoop` and whose node carries :class:`fxstream.meta.Grouped`: the analysis region it runs, its kind
(``"cut"`` or ``"halo"``, ``meta.KINDS``) and its stable id (``meta.region_id``: its first op's name, the same in
every compile of one graph). Code that looks for regions asks ``meta.grouped_calls(gm, kind)``, never a node's or
module's name, and reads the attributes below, which every kind has:

- ``kind``: ``"cut"`` or ``"halo"``;
- ``bodies``: the GraphModules it runs per slice, keyed by slice size (the planner plans each); a halo region
  runs its body band by band, planned by the rows simulation instead, so it has none;
- ``working_bytes``: what it holds on top of its whole outputs while it runs where that is not the bodies' plans
  (a halo region's bands); 0 for a cut region, whose working set comes from its bodies;
- ``partial``: the indices of outputs that are partial sums (GroupNorm statistics), made in its working set;
- ``in_flight``: the most slices whose working sets are live at once; ``nested``: whether its bodies hold regions
  of their own (a batch split);
- ``shards``: a :class:`fxstream.distributed.Shards` when its slices are spread over ranks, else None;
- ``out_meta``: (shape, strides, dtype) of each whole output.
"""
from __future__ import annotations

import torch

__all__ = ["RegionLoop"]


class RegionLoop(torch.nn.Module):
    """Base of :class:`~fxstream.runtime.LoopRegion` and :class:`~fxstream.halo_runtime.HaloLoop` (NOTE [One region
    model]); the defaults below are those of a region that does not override them."""

    kind = ""
    partial: tuple = ()
    working_bytes = 0
    in_flight = 1
    nested = False
    holds_loops = False

    def __init__(self):
        super().__init__()
        self.shards = None
