"""What to draw of a graph: boxes, arrows and colours, as plain data (no Graphviz needed to build or test it).

:func:`draw_graph` turns an exported or compiled GraphModule into a :class:`DrawGraph`. Thousands of ATen ops
are unreadable, so ops are collapsed by ``nn_module_stack`` into one box per module at ``depth`` (``depth=2``:
``down_blocks.0.resnets.1``); ops under ``expand`` are drawn one by one. A loop region of a compiled graph is one
box coloured by its slice axis and labelled with its slice count; a region whose body holds regions of its own
(a batch split), or ops under ``expand``, is drawn as a cluster around its body. Edges carry the shapes and bytes
of the values that cross them, and the box where the planned peak happens is flagged. The renderers
(:mod:`fxstream.render`) only turn this into DOT, SVG and HTML.

    >>> g = draw_graph(entry.compiled.graph_module, timeline=report.timeline["compiled"], peak_node=report.peak_node)
    >>> [n.label.splitlines()[0] for n in g.nodes][:3]
    ['sample', 'timestep', 'time_proj']

NOTE [Runs, not modules]
A box is a *run* of consecutive ops (in graph order) that share a module, not every op of the module: in a
compiled graph a region pulls ops out of the middle of a module, and a module called twice (or the top level,
between module calls) would otherwise become one box with arrows out and back in. A module split in two runs
gets two boxes, the second labelled ``(2)``.

NOTE [Constants are not drawn]
Ops that read no input, only weights and constants (AlphaBlender's ``ones -> sigmoid`` of the mix factor, the
``arange`` of positional embeddings), are left out: they hold a few bytes, and a compiled graph hoists them in
front of the first region that needs them, where they would float as boxes joined to the rest by long arrows.

NOTE [Marks]
``DrawNode.marks`` holds per-box marks such as ``"cache"`` and ``"skip"`` for Step Rehash (a cached feature
reused, a block skipped on a rehash step). They are read from ``fxstream.meta.Marks`` (set by the Step
Rehash pass on the full graph) and drawn when present. A box has a mark when one of its ops has it, except
``"skip"``: a box some of whose ops still run on a rehash step is marked ``"part skipped"``.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch.fx import GraphModule, Node

from .graph_utils import lifted
from .meta import Grouped, Marks, get_meta
from .region_loop import RegionLoop
from .runtime import LoopRegion

__all__ = ["DrawNode", "DrawEdge", "DrawCluster", "DrawGraph", "draw_graph", "DIM_COLOURS",
           "module_paths", "shape_text", "human_bytes"]

MINOR_EDGE = 0.01  # an edge carrying less than this share of the largest edge's bytes is minor

# Fill colours of regions per slice axis (ColorBrewer pastels), and of everything else.
DIM_COLOURS = {"frames": "#9ecae1", "height": "#a1d99b", "width": "#d9f0a3", "batch": "#fdae6b"}
_OTHER_DIM = "#dadaeb"
COLOURS = {"module": "#f2f2f2", "op": "#ffffff", "input": "#fff7bc", "output": "#fff7bc"}
_DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.bool: "bool"}


@dataclass(frozen=True)
class DrawNode:
    """One box: a run of ops of one module, one op, a loop region, an input or the output."""

    id: str
    kind: str  # "input" | "output" | "module" | "op" | "region"
    label: str  # lines separated by "\n"; the first names the box
    colour: str
    module: str = ""
    dim: str | None = None  # a region's slice axis
    slices: int = 0
    ops: int = 0
    peak_bytes: int = 0  # the most bytes live while the box ran (planned)
    peak: bool = False  # the graph's planned peak happens here
    marks: tuple = ()
    parent: str | None = None  # id of the cluster holding the box
    details: tuple = ()  # (key, value) pairs, shown on a click in the HTML page
    members: tuple = ()  # the graph nodes drawn as this box (``region_0/mul_3`` inside a batch region's body)


@dataclass(frozen=True)
class DrawEdge:
    """The values produced by ``src`` and read by ``dst``: their shapes (largest first) and total bytes."""

    src: str
    dst: str
    shapes: tuple
    bytes: int
    label: str
    minor: bool = False  # under MINOR_EDGE of the graph's largest edge (time embeddings, text states): drawn faint


@dataclass(frozen=True)
class DrawCluster:
    """A region drawn around its body: a batch region with regions inside, or one holding expanded ops."""

    id: str
    label: str
    colour: str
    dim: str
    slices: int
    peak: bool = False
    parent: str | None = None
    details: tuple = ()


@dataclass
class DrawGraph:
    """A graph ready to render: boxes, clusters, edges, the colours of the slice axes used, and the peak."""

    title: str
    nodes: list = field(default_factory=list)
    edges: list = field(default_factory=list)
    clusters: list = field(default_factory=list)
    colours: dict = field(default_factory=dict)  # slice axis -> fill colour, for the axes that appear
    peak_bytes: int = 0
    peak_id: str | None = None  # the box or cluster where the planned peak happens

    def node(self, node_id: str) -> DrawNode:
        return next(n for n in self.nodes if n.id == node_id)

    def find(self, first_line: str) -> list:
        """The boxes whose label starts with this line."""
        return [n for n in self.nodes if n.label.split("\n", 1)[0] == first_line]


def shape_text(val) -> str:
    """``2x320x72x128 f16`` for a tensor, ``''`` for anything else."""
    if not isinstance(val, torch.Tensor):
        return ""
    dims = "x".join(str(int(s)) for s in val.shape) or "scalar"
    return f"{dims} {_DTYPES.get(val.dtype, str(val.dtype).split('.')[-1])}"


def human_bytes(n: int) -> str:
    """``512 B``, ``3.0 KiB``, ``11.2 MiB``, ``1.23 GiB``."""
    for unit, scale, fmt in (("GiB", 2**30, ".2f"), ("MiB", 2**20, ".1f"), ("KiB", 2**10, ".1f")):
        if abs(n) >= scale:
            return f"{n / scale:{fmt}} {unit}"
    return f"{n} B"


def _bytes(val) -> int:
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _stack(n: Node) -> list:
    """(path, class name) of the modules ``n`` runs in, outermost first, without the root module."""
    stack = n.meta.get("nn_module_stack") or {}
    return [(path, cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls)))
            for path, cls in stack.values() if path]


def module_paths(gm: GraphModule) -> set:
    """Every module path that some op of ``gm`` (or of its loop bodies) runs in."""
    out = set()
    for g in _graphs(gm):
        for n in g.graph.nodes:
            out.update(p for p, _ in _stack(n))
    return out


def _graphs(gm: GraphModule):
    yield gm
    for m in gm.modules():
        if m is not gm and isinstance(m, GraphModule):
            yield m


def _under(path: str, root: str | None) -> bool:
    return root is not None and (path == root or path.startswith(root + "."))


def _op_name(n: Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def _is_weight(n: Node, user_inputs) -> bool:
    return n.name not in user_inputs if user_inputs is not None else lifted(n)


class _Run:
    """A box being built: a run of ops with the same key (see NOTE [Runs, not modules])."""

    def __init__(self, node_id, kind, module, cls, parent):
        self.id, self.kind, self.module, self.cls, self.parent = node_id, kind, module, cls, parent
        self.members: list = []  # qualified node names (as the memory timeline names them)
        self.ops: Counter = Counter()
        self.marks: set = set()
        self.runs_on_rehash = False  # an op of the box has no "skip" mark
        self.extra: dict = {}

    def mark(self, n: Node) -> None:
        m = get_meta(n, Marks)
        marks = m.names() if m is not None else ()
        self.marks.update(marks)
        self.runs_on_rehash |= "skip" not in marks


class _Builder:
    def __init__(self, prefix, timeline, depth, expand, user_inputs):
        self.prefix, self.depth, self.expand, self.user_inputs = prefix, depth, expand, user_inputs
        self.points = {t.node: t for t in (timeline or [])}
        self.runs: list = []
        self.clusters: list = []
        self.source: dict = {}  # fx node -> (box id, the fx node holding the value)
        self.edges: dict = {}  # (src, dst) -> {value node: val}
        self.current = None  # (key, parent) of the open run
        self.seen: Counter = Counter()  # runs opened per key, for the "(2)" suffix
        self.const: set = set()  # weights, and values computed from nothing else (see NOTE [Constants ...])

    def new_id(self) -> str:
        return f"{self.prefix}{len(self.runs) + len(self.clusters)}"

    # -- boxes -------------------------------------------------------------------------------------------------
    def run_for(self, key, kind, module, cls, parent) -> _Run:
        if self.current != (key, parent) or kind in ("input", "output", "region"):
            self.runs.append(_Run(self.new_id(), kind, module, cls, parent))
            self.seen[(key, parent)] += 1
            self.runs[-1].extra["run"] = self.seen[(key, parent)]
            self.current = (key, parent)
        return self.runs[-1]

    def key_of(self, n: Node):
        stack = _stack(n)
        path = stack[-1][0] if stack else ""
        if _under(path, self.expand):
            return ("op", n.name), "op", path, _op_name(n)
        if not stack:
            return ("module", ""), "module", "", ""
        path, cls = stack[min(self.depth, len(stack)) - 1]
        return ("module", path), "module", path, cls

    def add_edge(self, src: Node, dst_id: str) -> None:
        if src not in self.source:
            return  # weights and constants are not drawn
        src_id, holder = self.source[src]
        if src_id != dst_id:
            self.edges.setdefault((src_id, dst_id), {})[holder] = holder.meta.get("val")

    # -- the walk ----------------------------------------------------------------------------------------------
    def walk(self, gm: GraphModule, qual: str, parent: str | None, inputs=None) -> list:
        """Add ``gm``'s nodes; ``inputs`` are the outer nodes its placeholders stand for (a loop body).
        Returns the nodes its output stands for."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for i, n in enumerate(placeholders):
            if inputs is not None:
                if inputs[i] in self.source:
                    self.source[n] = self.source[inputs[i]]
                if inputs[i] in self.const:
                    self.const.add(n)
            elif _is_weight(n, self.user_inputs):
                self.const.add(n)
            else:
                run = self.run_for(("input", n.name), "input", "", "", parent)
                run.members.append(qual + n.name)
                self.source[n] = (run.id, n)
        for n in gm.graph.nodes:
            if n.op == "output":
                outs = list(_flat_nodes(n.args[0]))
                if inputs is not None:
                    return outs
                run = self.run_for(("output", ""), "output", "", "", parent)
                run.members.append(qual + n.name)
                for a in outs:
                    self.add_edge(a, run.id)
                return outs
            if n.op in ("call_module", "call_function") and all(p in self.const for p in n.all_input_nodes):
                self.const.add(n)
            elif n.op == "call_module":
                self.region(gm, n, qual, parent)
            elif n.op == "call_function":
                self.op(n, qual, parent)
        return []

    def op(self, n: Node, qual: str, parent) -> None:
        if n in self.source:
            return  # an output of a region drawn as a cluster: mapped to its body's node
        if n.target is operator.getitem and n.args[0] in self.source and isinstance(n.args[0].meta.get("val"), tuple):
            box, _ = self.source[n.args[0]]
            self.source[n] = (box, n)  # an output of a multi-output op or a region: same box, its own value
            return
        if not n.users and n.meta.get("val") is None:
            return  # checks such as _assert_tensor_metadata: nothing to draw
        key, kind, path, name = self.key_of(n)
        run = self.run_for(key, kind, path, name, parent)
        run.members.append(qual + n.name)
        run.ops[_op_name(n)] += 1
        run.mark(n)
        if kind == "op":
            run.extra["node"] = n.name
        for p in n.all_input_nodes:
            self.add_edge(p, run.id)
        self.source[n] = (run.id, n)

    def region(self, gm: GraphModule, n: Node, qual: str, parent) -> None:
        loop = gm.get_submodule(n.target)
        if not isinstance(loop, RegionLoop):
            raise ValueError(f"graph: call_module {n.target} is not a fxstream loop region")
        grouped = get_meta(n, Grouped)
        info = grouped.region if grouped is not None else None
        if loop.kind == "halo":  # NOTE [One region model]: a halo region is drawn as one box too
            r, body = loop.region, loop.body
            facts = {"dim": r.along if r.cols == 1 else "height x width",
                     "length": max(r.length(o) for o in r.outputs), "slices": loop.count,
                     "saved": r.saved_bytes,
                     "module": info.module if info is not None else _innermost_path(n),
                     "ops": len(info.nodes) if info is not None else len(r.nodes)}
        else:
            body = loop.bodies[max(loop.bodies, key=int)]  # the largest slice's body
            facts = {"dim": loop.axis, "length": loop.length, "slices": len(loop.bounds),
                     "saved": info.saved_bytes if info is not None else 0,
                     # the report's name: the common path of its ops (a ModuleList such as down_blocks is on no stack)
                     "module": info.module if info is not None else _innermost_path(n),
                     # the region's own ops, as the explain table counts them (a body adds reshapes of strided slices)
                     "ops": len(info.nodes) if info is not None else
                     sum(x.op == "call_function" for x in body.graph.nodes)}
        nested = any(isinstance(m, LoopRegion) for m in body.modules())
        expanded = any(_under(_innermost_path(x), self.expand) for x in body.graph.nodes)
        self.current = None
        if nested or expanded:
            cid = self.new_id()
            self.clusters.append((cid, facts, parent, qual + n.name))
            outs = self.walk(body, f"{qual}{n.name}/", cid, inputs=list(n.args))
            self.current = None
            for user in n.users:  # the region's outputs are its body's outputs
                if user.target is operator.getitem and outs[user.args[1]] in self.source:
                    self.source[user] = self.source[outs[user.args[1]]]
            return
        run = self.run_for(("region", n.name), "region", facts["module"], "", parent)
        run.members.append(qual + n.name)
        run.extra.update(facts)
        for x in body.graph.nodes:
            if x.op == "call_function":
                run.mark(x)
        for p in n.all_input_nodes:
            self.add_edge(p, run.id)
        self.source[n] = (run.id, n)
        self.current = None


def _flat_nodes(arg):
    if isinstance(arg, Node):
        yield arg
    elif isinstance(arg, (list, tuple)):
        for a in arg:
            yield from _flat_nodes(a)
    elif isinstance(arg, dict):
        for a in arg.values():
            yield from _flat_nodes(a)


def _innermost_path(n: Node) -> str:
    stack = _stack(n)
    return stack[-1][0] if stack else ""


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def _ops_text(ops: Counter, limit: int = 6) -> str:
    top = ops.most_common(limit)
    text = ", ".join(f"{name} x{k}" if k > 1 else name for name, k in top)
    return text + (f", +{len(ops) - limit} more kinds" if len(ops) > limit else "")


def draw_graph(gm: GraphModule, *, title: str = "", timeline=None, peak_node: str = "", depth: int = 2,
               expand: str | None = None, user_inputs=None, prefix: str = "n") -> DrawGraph:
    """The :class:`DrawGraph` of an exported or compiled GraphModule.

    ``timeline`` (``report.timeline["original"]`` or ``["compiled"]``) gives each box the most bytes live while
    it ran, and ``peak_node`` (``report.original_peak_node`` / ``report.peak_node``) the box to flag. ``depth``
    is how many levels of the module stack a box spans (``depth=1``: ``down_blocks.0``); ops of the module
    ``expand`` are drawn one by one. ``user_inputs`` names the placeholders that are inputs (the rest are
    weights, not drawn); without it, placeholders named ``p_``/``b_``/``c_`` are taken as weights.
    """
    if depth < 1:
        raise ValueError(f"depth: expected an int >= 1 (module levels per box), got {depth!r}")
    b = _Builder(prefix, timeline, depth, expand, set(user_inputs) if user_inputs is not None else None)
    b.walk(gm, "", None)
    out = DrawGraph(title)
    for run in b.runs:
        out.nodes.append(_node_of(run, b.points, peak_node))
    for cid, facts, parent, qname in b.clusters:
        out.clusters.append(_cluster_of(cid, facts, parent, b.points.get(qname), peak_node == qname))
    for (src, dst), vals in b.edges.items():
        items = sorted(((shape_text(v), _bytes(v)) for v in vals.values()), key=lambda x: -x[1])
        shapes = tuple(s for s, _ in items if s)
        total = sum(x for _, x in items)
        label = "\n".join(filter(None, [shapes[0] if shapes else "",
                                        f"+{len(shapes) - 1} more" if len(shapes) > 1 else "",
                                        human_bytes(total) if total else ""]))
        out.edges.append(DrawEdge(src, dst, shapes, total, label))
    heaviest = max((e.bytes for e in out.edges), default=0)
    out.edges = [replace(e, minor=e.bytes < MINOR_EDGE * heaviest) for e in out.edges]
    out.colours = {d: DIM_COLOURS.get(d, _OTHER_DIM) for d in
                   sorted({n.dim for n in out.nodes if n.dim} | {c.dim for c in out.clusters})}
    peak = next((n for n in out.nodes if n.peak), None) or next((c for c in out.clusters if c.peak), None)
    out.peak_id = peak.id if peak is not None else None
    out.peak_bytes = max((t.peak_bytes for t in b.points.values()), default=0)
    return out


def _node_of(run: _Run, points: dict, peak_node: str) -> DrawNode:
    live = [points[m] for m in run.members if m in points]
    peak_bytes = max((t.peak_bytes for t in live), default=0)
    peak = peak_node in run.members
    nth = f" ({run.extra['run']})" if run.extra.get("run", 1) > 1 and run.kind == "module" else ""
    details = [("kind", run.kind)]
    if run.kind == "region":
        x = run.extra
        ops = x["ops"]
        colour = DIM_COLOURS.get(x["dim"], _OTHER_DIM)
        lines = [x["module"] or "(top level)", f"{x['slices']} slices along {x['dim']} (length {x['length']})",
                 _plural(ops, "op")]
        details += [("module", x["module"] or "(top level)"), ("slice axis", f"{x['dim']}, length {x['length']}"),
                    ("slices", str(x["slices"])), ("ops in the loop", str(ops)),
                    ("bytes never whole", human_bytes(x["saved"]))]
        node = dict(kind="region", dim=x["dim"], slices=x["slices"], ops=ops, module=x["module"])
    elif run.kind in ("input", "output"):
        colour = COLOURS[run.kind]
        lines = [run.members[0].split("/")[-1] if run.kind == "input" else "output"]
        node = dict(kind=run.kind)
    else:
        ops = sum(run.ops.values())
        colour = COLOURS[run.kind]
        if run.kind == "op":
            lines = [next(iter(run.ops)), run.extra["node"]]
        elif run.module:
            lines = [run.module + nth, f"{run.cls} · {_plural(ops, 'op')}"]
        else:  # ops between module calls: name them
            lines = ["(top level)", _ops_text(run.ops, 3)]
        details += [("module", run.module or "(top level)"), ("class", run.cls or "-"),
                    ("ops", f"{ops}: {_ops_text(run.ops)}")]
        node = dict(kind=run.kind, ops=ops, module=run.module)
    if peak_bytes:
        details.append(("most live while it runs", human_bytes(peak_bytes)))
    if peak:
        lines.append(f"PEAK {human_bytes(peak_bytes)}")
        details.append(("planned peak", f"here, at node {peak_node}"))
    marks = set(run.marks)
    if "skip" in marks and run.runs_on_rehash:
        marks = marks - {"skip"} | {"part skipped"}
    marks = tuple(sorted(marks))
    if marks:
        lines.append(" ".join(f"[{m}]" for m in marks))
        details.append(("marks", ", ".join(marks)))
    details.append(("graph nodes", ", ".join(run.members[:8]) + (" ..." if len(run.members) > 8 else "")))
    return DrawNode(run.id, label="\n".join(lines), colour=colour, peak_bytes=peak_bytes, peak=peak, marks=marks,
                    parent=run.parent, details=tuple(details), members=tuple(run.members), **node)


def _cluster_of(cid, facts, parent, point, peak: bool) -> DrawCluster:
    module = facts["module"] or "(top level)"
    label = f"{module}\n{facts['slices']} slices along {facts['dim']} (length {facts['length']})"
    details = [("kind", "loop region, drawn with its body"), ("module", module),
               ("slice axis", f"{facts['dim']}, length {facts['length']}"), ("slices", str(facts["slices"])),
               ("ops in the loop", str(facts["ops"])), ("bytes never whole", human_bytes(facts["saved"]))]
    if point is not None:
        details.append(("most live while it runs", human_bytes(point.peak_bytes)))
    if peak:
        label += f"\nPEAK {human_bytes(point.peak_bytes if point else 0)}"
    return DrawCluster(cid, label, DIM_COLOURS.get(facts["dim"], _OTHER_DIM), facts["dim"], facts["slices"],
                       peak, parent, tuple(details))
