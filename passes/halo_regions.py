"""Halo grouping: each halo region (:func:`fxstream.analysis.halo.find_halo_regions`) becomes one ``call_module``
node running a :class:`~fxstream.halo_runtime.HaloLoop` over a body GraphModule of the region's ops.

The body keeps the ops as they were (full-size metadata: the runtime reads every band's size off it); the graph is
emitted again in a topological order of the condensed DAG, as Operator Grouping does, with ``getitem`` nodes for
the region's outputs.
"""
from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule

from fxstream.analysis.halo import HaloRegion
from fxstream.graph_utils import lazy_module
from fxstream.halo_runtime import HaloLoop
from fxstream.runtime import buffer_layout

from .group_regions import emit_grouped

__all__ = ["group_halo_regions", "build_halo_body"]



def build_halo_body(region: HaloRegion) -> tuple[GraphModule, list, list]:
    """The region's ops as a GraphModule (placeholders: its inputs; outputs: its outputs), the height dim of
    each placeholder and op, in order (None: read whole), and their width dims (a grid; else empty)."""
    g = Graph()
    env: dict = {}
    dims = []
    for i, p in enumerate(region.inputs):
        ph = g.placeholder(f"{p.name}_{i}")
        ph.meta.update(p.meta)
        env[p] = ph
        dims.append(region.dims.get(p))
    for n in region.nodes:
        env[n] = g.node_copy(n, env.__getitem__)
        dims.append(region.dims[n])
    g.output(tuple(env[o] for o in region.outputs))
    wdims = [region.wdims.get(n) for n in [*region.inputs, *region.nodes]] if region.cols > 1 else []
    return lazy_module(torch.nn.Module(), g), dims, wdims


def make_halo_loop(region: HaloRegion) -> HaloLoop:
    body, dims, wdims = build_halo_body(region)
    parked = [i for i, n in enumerate(region.nodes) if n in region.parked]
    return HaloLoop(body, dims, region.count, [buffer_layout(o.meta["val"]) for o in region.outputs], wdims,
                    region.cols, region.along, parked)


def group_halo_regions(gm: GraphModule, regions: list) -> GraphModule:
    """A new GraphModule in which every halo region is a ``call_module`` node (``gm`` itself if none)."""
    if not regions:
        return gm
    return emit_grouped(gm, regions, "halo", make_halo_loop, "halo")
