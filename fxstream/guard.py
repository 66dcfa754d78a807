"""The structure guard: what a capture bakes into the graph besides the weights' values, and a per-call check that
none of it changed (``CompiledModule`` keys its compiled signatures on :meth:`StructureGuard.key`).

NOTE [Structure guard]
The key (a walk of the module tree: ~20 ms on full-size SVD) holds, for every submodule: its class, its training
flag, every attribute that is not nn.Module bookkeeping, its parameters' and buffers' names, types, dtypes,
devices and shapes (their values are read at every call), and its forward (pre-)hooks; plus torch's global
forward hooks. An attribute value is described by what it is:

- scalars, strings, dtypes, devices: by type and value; tuples, lists, dicts and sets: by their items;
- other objects whose state is a ``__dict__`` (diffusers' attention processors): by class and their attributes,
  recursively (``MAX_DEPTH`` levels), so that a processor swapped for one of another class compiles again and one
  swapped for an equal one does not;
- functions, methods, classes, tensors that are not buffers, modules held outside the tree, objects without a
  readable ``__dict__`` (slots, C objects) and anything deeper than ``MAX_DEPTH``: by identity (``id``; the guard
  keeps the object alive, so that no other object can take its id). Swapping one compiles again, even for an
  equal one (conservative); a change *inside* one cannot be seen.

The key is recomputed only when something may have changed. The check made at every call (0.55 ms on full-size
SVD, against about 10 ms for the full hash every call computed before: :func:`bench`, and
``docs/benchmarks.md``, "Guard cost") compares:

1. a counter bumped by ``nn.Module.__setattr__`` / ``__delattr__`` on a module of a guarded tree (wrappers
   installed on ``nn.Module`` once, around whatever it has; checked at every call to still be there): every
   attribute, submodule, parameter or buffer assignment, ``.train()``/``.eval()``, ``set_attn_processor``,
   ``fuse_qkv_projections``, FreeU, forward chunking, PEFT's adapters, ``load_state_dict(assign=True)``. Every
   capture bumps it too (:func:`touched`): ``torch.export`` rebinds list attributes through ``__dict__``;
2. the lengths of every module's parameter, buffer, submodule and forward (pre-)hook dicts, and the keys and
   identities of the non-empty ones (``register_*`` and hooks write these dicts directly; so does accelerate);
3. the dtype and device of every parameter, buffer and tensor attribute (``.to()`` on a submodule and
   ``param.data = ...`` change them in place);
4. the lengths, keys and identities of the contents of every dict, list and set and of every object ``__dict__``
   the key described (PEFT's ``scaling`` dict, a processor's settings), and of torch's global forward hook dicts.

Not detected, by design: writes that bypass ``nn.Module.__setattr__`` on a module outside a capture
(``m.__dict__[k] = v``, ``object.__setattr__(m, ...)``); a weight's shape changed in place (``param.data = t``
of another shape; a new Parameter is seen, as is a dtype or device changed in place; checking shapes as well
costs ~0.3 ms more per call); changes inside an object described by identity; changes to classes (a method
patched on the class); backward hooks (compiled graphs are inference graphs).
A module whose class overrides ``__setattr__`` or ``__delattr__`` (which may write ``__dict__`` itself) makes the
guard walk the whole tree at every call instead: exact, at the full cost.
"""
from __future__ import annotations

import functools
import itertools
import logging
import operator
import types
import weakref

import torch

log = logging.getLogger(__name__)

__all__ = ["StructureGuard", "Key", "MAX_DEPTH", "touched", "bench"]

MAX_DEPTH = 3  # levels of attribute objects described by content (a module's attribute is level 1)
# nn.Module's own bookkeeping (parameter, buffer, submodule and hook dicts, the training flag): described otherwise
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
_SIZED = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
                 "_global_forward_hooks_always_called")
_SCALARS = frozenset({bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
                      torch.memory_format})
_BY_IDENTITY = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.BuiltinMethodType,
                types.ModuleType, functools.partial, type)
_DTYPE, _DEVICE = operator.attrgetter("dtype"), operator.attrgetter("device")
_chain = itertools.chain.from_iterable


# -- the change counter ---------------------------------------------------------------------------------------
_COUNTER = [0]
_WATCHED: set = set()  # id() of every module of a guarded tree (stale ids only cause extra walks)
_GUARDS: weakref.WeakSet = weakref.WeakSet()
_HOOKED: dict = {}  # "setattr"/"delattr" -> (the wrapper installed, the function it wraps)


def _counted(original, name: str):
    def wrapper(self, *args):
        try:
            return original(self, *args)
        finally:
            if id(self) in _WATCHED:
                _COUNTER[0] += 1
    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__wrapped__ = original
    return wrapper


def _counting() -> bool:
    """Install the counting wrappers on nn.Module (again, if something replaced them); False if just (re)installed:
    a change made before then was not counted."""
    ok = True
    for name in ("__setattr__", "__delattr__"):
        current = getattr(torch.nn.Module, name)
        if _HOOKED.get(name, (None,))[0] is not current:
            wrapper = _counted(current, name)
            setattr(torch.nn.Module, name, wrapper)
            _HOOKED[name] = (wrapper, current)
            ok = False
    return ok


def touched() -> None:
    """Make every guard walk its module again at its next call: for changes made behind ``nn.Module.__setattr__``
    (``torch.export`` rebinds list attributes of the module it captures through ``__dict__``)."""
    _COUNTER[0] += 1


def _rewatch() -> None:
    global _WATCHED
    watched = set()
    for g in list(_GUARDS):
        watched.update(g._module_ids)
    _WATCHED = watched  # swapped whole: a write on another thread meanwhile still sees a complete set


# -- the key ----------------------------------------------------------------------------------------------------
class Key:
    """A structure key: its items compared on a hash match (no collision can alias two structures)."""

    __slots__ = ("items", "_hash")

    def __init__(self, items: tuple):
        self.items = items
        self._hash = hash(items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Key) and self._hash == other._hash and self.items == other.items)

    def __repr__(self) -> str:
        return f"Key({self._hash:#x})"


def _no_skip(cls) -> tuple:
    return ()


def _type_key(t: type) -> tuple:
    return (t.__module__, t.__qualname__, id(t))


@functools.lru_cache(maxsize=None)
def _has_slots(t: type) -> bool:
    return any(set(getattr(c, "__slots__", ())) - {"__dict__", "__weakref__"} for c in t.__mro__[:-1])


class _Walk:
    """One walk of a module tree: the key's items, and what the per-call check compares."""

    def __init__(self, skip_attrs):
        self.skip_attrs = skip_attrs
        self.refs: list = []  # objects described by id(): kept alive so that no id is reused
        self.sized: list = []  # containers whose length the check compares
        self.dicts: list = []  # dicts whose keys and values' identities the check compares
        self.seqs: list = []  # lists and sets likewise
        self.tensors: list = []  # tensors whose dtype and device the check compares
        self.module_ids: set = set()
        self.overriding: set = set()  # module classes with their own __setattr__/__delattr__
        self._memo: dict = {}

    def module(self, name: str, m: torch.nn.Module) -> tuple:
        t = type(m)
        if t.__setattr__ is not torch.nn.Module.__setattr__ or t.__delattr__ is not torch.nn.Module.__delattr__:
            self.overriding.add(t)
        self.module_ids.add(id(m))
        for attr in _SIZED:
            d = getattr(m, attr)
            self.sized.append(d)
            if d:
                self.dicts.append(d)
        skip = self.skip_attrs(t)
        attrs = tuple((k, self.value(v, 1)) for k, v in vars(m).items() if k not in _MODULE_INTERNALS and k not in skip)
        tensors = tuple((k, None if p is None else self.tensor(p)) for d in (m._parameters, m._buffers)
                        for k, p in d.items())
        hooks = tuple((k, self.value(h, 1), k in m._forward_pre_hooks_with_kwargs)
                      for k, h in m._forward_pre_hooks.items())
        hooks += tuple((k, self.value(h, 1), k in m._forward_hooks_with_kwargs, k in m._forward_hooks_always_called)
                       for k, h in m._forward_hooks.items())
        return (name, _type_key(t), m.training, attrs, tensors, hooks)

    def tensor(self, t: torch.Tensor) -> tuple:
        self.tensors.append(t)
        return (_type_key(type(t)), t.dtype, t.device, tuple(t.shape))

    def opaque(self, v) -> tuple:
        self.refs.append(v)
        return ("id", _type_key(type(v)), id(v))

    def value(self, v, depth: int):
        t = type(v)
        if t in _SCALARS:
            return (t, v)
        memo = self._memo.get(id(v))
        if memo is not None and memo[0] is v:
            return memo[1]
        out = self._describe(v, t, depth)
        self._memo[id(v)] = (v, out)
        return out

    def _describe(self, v, t: type, depth: int):
        if isinstance(v, torch.Tensor):  # a tensor attribute is a constant of the graph: by identity and metadata
            return self.opaque(v) + self.tensor(v)
        if isinstance(v, (torch.nn.Module, *_BY_IDENTITY)) or depth > MAX_DEPTH:
            return self.opaque(v)
        if isinstance(v, (tuple, list)):
            self._container(v, isinstance(v, list))
            return (_type_key(t), tuple(self.value(x, depth + 1) for x in v))
        if isinstance(v, (set, frozenset)):
            self._container(v, isinstance(v, set))
            return (_type_key(t), frozenset(self.value(x, depth + 1) for x in v))
        if isinstance(v, dict):
            self._container(v, True, is_dict=True)
            return (_type_key(t), tuple((self.value(k, depth + 1), self.value(x, depth + 1)) for k, x in v.items()))
        state = getattr(v, "__dict__", None) if not _has_slots(t) else None
        if type(state) is not dict:  # no readable state: a swap is seen, a change inside is not
            return self.opaque(v)
        self._container(state, True, is_dict=True)
        return ("object", _type_key(t), tuple((k, self.value(x, depth + 1)) for k, x in state.items()))

    def _container(self, c, mutable: bool, is_dict: bool = False) -> None:
        if mutable:
            self.sized.append(c)
            (self.dicts if is_dict else self.seqs).append(c)

    def global_hooks(self) -> tuple:
        import torch.nn.modules.module as mm
        out = []
        for name in _GLOBAL_HOOKS:
            d = getattr(mm, name, None)
            if isinstance(d, dict):
                self._container(d, True, is_dict=True)
                out.append((name, tuple((k, self.value(h, 1)) for k, h in d.items())))
        return tuple(out)


class _Snapshot:
    """What the per-call check compares, as taken right after a walk. Each part is one C-level pass, cheapest
    first, and the first difference stops the check."""

    def __init__(self, walk: _Walk):
        self.empty = [c for c in walk.sized if not len(c)]  # most hook, buffer and submodule dicts: stay empty
        self.sized = [c for c in walk.sized if len(c)]
        self.dicts, self.seqs, self.tensors = walk.dicts, walk.seqs, walk.tensors
        self.lens = tuple(map(len, self.sized))
        self.keys = tuple(_chain(self.dicts))
        # compared by identity, and kept alive: no other object can take one's id while it is compared
        self.values = tuple(self._values())
        self.dtypes = tuple(map(_DTYPE, self.tensors))
        self.devices = tuple(map(_DEVICE, self.tensors))

    def _values(self):
        return itertools.chain(_chain(map(dict.values, self.dicts)), _chain(self.seqs))

    def unchanged(self) -> bool:
        try:
            return (not any(self.empty) and tuple(map(len, self.sized)) == self.lens
                    and tuple(_chain(self.dicts)) == self.keys and all(map(operator.is_, self._values(), self.values))
                    and tuple(map(_DTYPE, self.tensors)) == self.dtypes
                    and tuple(map(_DEVICE, self.tensors)) == self.devices)
        except RuntimeError:  # a container changed size while read (another thread): walk again
            return False


class StructureGuard:
    """The structure key of ``module``'s tree, recomputed only when the per-call check sees a change (see
    ``NOTE [Structure guard]``). ``skip_attrs(cls)``: attribute names of that module class that are bookkeeping,
    not structure (fxstream's own wrappers)."""

    def __init__(self, module: torch.nn.Module, skip_attrs=None):
        self.module = module
        self.skip_attrs = skip_attrs if skip_attrs is not None else _no_skip
        self.walks = 0  # how many times the key was computed (tests and benchmarks read it)
        self._key = None
        self._count = None
        self._snapshot = None
        self._module_ids: set = set()
        self._always_walk = False
        _GUARDS.add(self)

    def __getstate__(self) -> dict:  # a copy or an unpickled guard starts afresh (walks at its first call)
        return {"module": self.module, "skip_attrs": self.skip_attrs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["module"], state["skip_attrs"])

    def key(self) -> Key:
        if (self._key is not None and not self._always_walk and _counting() and self._count == _COUNTER[0]
                and self._snapshot.unchanged()):
            return self._key
        return self._walk()

    def _walk(self) -> Key:
        _counting()
        count = _COUNTER[0]  # read before walking: a change made during the walk is seen by the next check
        walk = _Walk(self.skip_attrs)
        items = tuple(walk.module(name, m) for name, m in self.module.named_modules()) + (walk.global_hooks(),)
        key = Key(items)
        self._key = key if key != self._key else self._key  # an unchanged structure keeps its key object
        self._refs = walk.refs
        self._snapshot = _Snapshot(walk)
        self._count = count
        self._module_ids = walk.module_ids
        if walk.overriding and not self._always_walk:
            log.info("fxstream: %s override __setattr__/__delattr__: the structure guard walks the whole module at "
                     "every call", ", ".join(sorted(t.__qualname__ for t in walk.overriding)))
        self._always_walk = bool(walk.overriding)
        self.walks += 1
        _rewatch()
        return self._key


def bench(model: str = "svd") -> tuple:
    """The guard's cost on ``fxstream.models.build_unet(model)`` built on the meta device (default: full-size
    SVD): one walk, and the per-call check (best of 5 runs of 100 calls), in seconds; printed too.
    ``python -c "import fxstream.guard as g; g.bench()"``."""
    import time

    from .models import build_unet
    module = build_unet(model, device="meta")
    guard = StructureGuard(module)
    start = time.perf_counter()
    key = guard.key()
    walk = time.perf_counter() - start
    check = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(100):
            if guard.key() is not key:
                raise RuntimeError("the structure changed while measuring")
        check = min(check, (time.perf_counter() - start) / 100)
    print(f"{model}: {sum(1 for _ in module.modules())} modules, {len(guard._snapshot.tensors)} weights; walk "
          f"{walk * 1e3:.1f} ms, per-call check {check * 1e3:.3f} ms")
    return walk, check
