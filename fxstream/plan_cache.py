"""A disk cache of the memory budget's decisions: a second process compiling the same graph under the same
``Policy(max_memory=...)`` makes one compile instead of the budget's search.

The folder is ``Policy.cache_dir``, else the environment variable ``FXSTREAM_CACHE_DIR``; neither set (or
``cache_dir=""`` / ``False``): no cache, nothing is read or written.

*What is stored* is a decision, not a graph: the arguments of the one :func:`~fxstream.compiler.compile_graph` call
whose result :func:`~fxstream.budget.compile_for` returned (:class:`~fxstream.compiler.MadeWith`: the policy it
compiled with, per-region slice counts, what halo regions keep whole, slices in flight), its planned peak, and the
lower bound once computed; or, for a budget no slicing meets, the :class:`~fxstream.MemoryBudgetError`'s figures,
raised again. The module is captured again every time and the decision compiled again from that capture, so an
entry decides how much is sliced, never what is computed (every slicing fxstream makes is exact). A replayed
decision is checked: its planned peak must be the one stored and fit ``max_memory``; else a warning, the search,
and the entry overwritten.

*The key* (the file name) is a sha256 of the captured graph (its code and every placeholder's shape, stride, dtype
and device: the input signature and the weights), the policy less the fields that do not change a compile
(``cache_dir``, ``cache_size``, ``verify``), the weight bytes, this file format's number and the
versions of torch, diffusers and fxstream (with a digest of fxstream's own files, so that an edited checkout never
replays a decision of the code before it).

*Concurrent processes*: one JSON file per key, written to a temporary file in the same folder and renamed over it
(``os.replace``, atomic): a reader sees a whole file or none, two writers of one key leave one of the two whole
files. A file that cannot be read (not JSON, another format number, a field missing or of the wrong type) or that
does not belong to its key is ignored with one ``RuntimeWarning`` naming it, and the search runs again.

Only budget compiles (``max_memory`` set: the video budget's search, the halo search) are cached: a policy with
counts as given is one compile already, and replaying it would save nothing. Under ``Policy(distributed=...)`` the
budget per rank's search (NOTE [A budget per rank]) is cached the same way (:func:`rank_budget_cached`): its key
adds the rank count, its entry holds the policy the search compiled with and the busiest rank's planned peak.
Logged at INFO (``fxstream.plan_cache``): ``cache hit <file>``, ``stored <file>``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch.fx import GraphModule

from .budget import compile_for, deferred_bound
from .compiler import CompiledGraph, MadeWith, compile_graph
from .errors import MemoryBudgetError
from .memory import plan_memory
from .policy import Policy
from .rehash import StepRehash
from .halo_runtime import set_line_buffers
from .runtime import set_in_flight

log = logging.getLogger(__name__)

__all__ = ["ENV", "FORMAT", "compile_cached", "cache_folder", "plan_key", "rank_budget_cached", "replay", "load",
           "store", "versions"]

ENV = "FXSTREAM_CACHE_DIR"
FORMAT = 5  # bump when the file's fields change: older files are then ignored (with a warning) and rewritten
_NOT_KEYED = ("cache_dir", "cache_size", "verify", "distributed")  # Policy fields that do not change a compile
_unwritable: set = set()  # folders warned about (once per process)


def cache_folder(policy: Policy) -> Path | None:
    """The plan cache's folder for ``policy``: ``Policy.cache_dir``, else ``$FXSTREAM_CACHE_DIR``; None (no cache)
    when neither is set or ``cache_dir`` is ``""`` / ``False``."""
    d = policy.cache_dir
    if d is None:
        d = os.environ.get(ENV) or None
    return Path(d).expanduser() if d else None


# -- the key ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def versions() -> dict:
    """The versions in every key: torch, diffusers (None when not installed), fxstream and a digest of its files."""
    import fxstream
    import fxstream.passes
    try:
        diffusers = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        diffusers = None
    h = hashlib.sha256()
    roots = [Path(fxstream.__file__).parent] + [Path(p) for p in fxstream.passes.__path__]
    for root in roots:
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return {"torch": torch.__version__, "diffusers": diffusers, "fxstream": fxstream.__version__,
            "fxstream_files": h.hexdigest()[:16]}


def _signature(v) -> str:
    """A placeholder's fake value as text: shape, stride, dtype and device of a tensor; ``repr`` of anything else."""
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}{tuple(v.stride())}{v.dtype}{v.device}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_signature(x) for x in v) + "]"
    return repr(v)


def _policy_key(policy: Policy) -> str:
    return ", ".join(f"{f.name}={getattr(policy, f.name)!r}" for f in fields(policy) if f.name not in _NOT_KEYED)


def plan_key(gm: GraphModule, policy: Policy, weights: int, ranks: int | None = None) -> str:
    """The cache key (hex sha256) of compiling the captured graph ``gm`` under ``policy`` with ``weights`` bytes of
    weights (see the module docstring); with ``ranks``, of the budget per rank on that many ranks."""
    h = hashlib.sha256()

    def put(text) -> None:
        h.update(str(text).encode() + b"\0")

    put(f"fxstream plan cache format {FORMAT}")
    put(json.dumps(versions(), sort_keys=True))
    put(gm.code)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            put(f"{n.name}: {_signature(n.meta.get('val'))}")
    put(_policy_key(policy))
    put(weights)
    if ranks is not None:
        put(f"a budget per rank on {ranks} ranks")
    return h.hexdigest()


# -- a decision as JSON -------------------------------------------------------------------------------------------
def _policy_json(policy: Policy) -> dict:
    out = {}
    for f in fields(policy):
        v = getattr(policy, f.name)
        if f.name in ("cache_dir", "distributed"):  # a folder of this process, a process group
            continue
        if isinstance(v, StepRehash):
            v = {g.name: list(x) if isinstance(x := getattr(v, g.name), tuple) else x for g in fields(v)}
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _policy_from(d: dict) -> Policy:
    if not isinstance(d, dict):
        raise TypeError(f"policy: expected an object, got {type(d).__name__}")
    d = dict(d)
    if d.get("rehash") is not None:
        d["rehash"] = StepRehash(**d["rehash"])
    return Policy(**d)


def _counts(d, what: str) -> dict:
    if not isinstance(d, dict) or not all(isinstance(k, str) and type(v) is int and v >= 1 for k, v in d.items()):
        raise TypeError(f"{what}: expected an object of region id -> slice count, got {d!r}")
    return d


def _optional_int(v, what: str):
    if v is not None and type(v) is not int:
        raise TypeError(f"{what}: expected null or an int, got {v!r}")
    return v


def _bool(v, what: str) -> bool:
    if type(v) is not bool:
        raise TypeError(f"{what}: expected true or false, got {v!r}")
    return v


def _made_json(m: MadeWith) -> dict:
    return {"policy": _policy_json(m.policy), "counts": m.counts, "inner_counts": m.inner_counts,
            "halo_keep": m.halo_keep, "in_flight": m.in_flight, "check_peak": m.check_peak,
            "line_buffers": m.line_buffers, "norms": None if m.norms is None else [
                None if names is None else list(names) for names in m.norms], "cut_within": m.cut_within}


def _made_from(d: dict) -> MadeWith:
    inner = d["inner_counts"]
    if inner is not None and not isinstance(inner, list):
        raise TypeError(f"inner_counts: expected null or a list, got {inner!r}")
    return MadeWith(_policy_from(d["policy"]),
                    None if d["counts"] is None else _counts(d["counts"], "counts"),
                    None if inner is None else [None if c is None else _counts(c, "inner_counts[...]") for c in inner],
                    _optional_int(d["halo_keep"], "halo_keep"), _optional_int(d["in_flight"], "in_flight"),
                    _bool(d["check_peak"], "check_peak"), _optional_int(d["line_buffers"], "line_buffers"),
                    _norms(d["norms"]), _bool(d["cut_within"], "cut_within"))


def _norms(v) -> tuple | None:
    """``MadeWith.norms`` from JSON: null, or a list of (null or a list of node names)."""
    if v is None:
        return None
    if not isinstance(v, list) or not all(x is None or (isinstance(x, list) and all(isinstance(n, str) for n in x))
                                          for x in v):
        raise TypeError(f"norms: expected null or a list of null or lists of names, got {v!r}")
    return tuple(None if x is None else tuple(x) for x in v)


def _record(key: str, policy: Policy, made: MadeWith | None = None, peak: int | None = None, bound=None,
            error: MemoryBudgetError | None = None) -> dict:
    return {"format": FORMAT, "key": key, "versions": versions(), "policy": policy.describe(),
            "made_with": None if made is None else _made_json(made), "peak_bytes": peak,
            "lower_bound_bytes": bound if isinstance(bound, int) else None,
            "error": None if error is None else {"message": str(error), "max_memory": error.max_memory,
                                                 "weight_bytes": error.weight_bytes,
                                                 "lower_bound_bytes": error.lower_bound_bytes}}


def _check(record, path: Path, decision: str = "made_with", peak: str = "peak_bytes", parse=None) -> dict:
    """``record`` (a file's JSON) checked field by field; ValueError or TypeError saying what is wrong. A budget's
    entry holds its decision in ``made_with`` (made a :class:`MadeWith`) and its planned peak in ``peak_bytes``;
    a budget-per-rank entry (:func:`_check_ranks`) its policy in ``compiled_with`` and ``rank_peak_bytes``."""
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    if record.get("format") != FORMAT:
        raise ValueError(f"format {record.get('format')!r}, this fxstream reads format {FORMAT}")
    if record.get("key") != path.stem or record.get("versions") != versions():
        raise ValueError(f"written for key {record.get('key')!r} with {record.get('versions')!r}, not for this key "
                         f"with {versions()!r}")
    if record.get("error") is not None:
        e = record["error"]
        if not isinstance(e, dict) or not isinstance(e.get("message"), str) or \
                any(type(e.get(k)) is not int for k in ("max_memory", "weight_bytes", "lower_bound_bytes")):
            raise TypeError(f"error: expected message, max_memory, weight_bytes and lower_bound_bytes, got {e!r}")
        return record
    if not isinstance(record.get(decision), dict) or type(record.get(peak)) is not int:
        raise TypeError(f"expected {decision} (an object) and {peak} (an int)")
    record[decision] = (parse or _made_from)(record[decision])
    _optional_int(record.get("lower_bound_bytes"), "lower_bound_bytes")
    return record


def _check_ranks(record, path: Path) -> dict:
    """A budget-per-rank entry (:func:`rank_budget_cached`) checked; its ``compiled_with`` a :class:`Policy`."""
    return _check(record, path, "compiled_with", "rank_peak_bytes", _policy_from)


def _ignored(path: Path, why: str) -> None:
    warnings.warn(f"fxstream: plan cache entry {path} ignored ({why}); searching again and overwriting it",
                  RuntimeWarning, stacklevel=4)


def load(path: Path, check=_check) -> dict | None:
    """The entry at ``path`` checked by ``check`` (by default a budget's decision: its ``made_with`` a
    :class:`MadeWith`); None when there is none, or with a RuntimeWarning naming the file when it cannot be read or
    does not belong to its key."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # no entry, or no folder yet
        return None
    except (OSError, UnicodeDecodeError) as e:
        _ignored(path, f"cannot be read: {e}")
        return None
    try:
        return check(json.loads(text), path)
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        _ignored(path, f"{type(e).__name__}: {e}")
        return None


def store(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` atomically: a temporary file in the same folder, renamed over ``path``. A folder
    that cannot be written is warned about once per process and nothing is stored."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}-", suffix=".tmp")
        os.chmod(tmp, 0o644)  # mkstemp makes it private: the folder may be shared
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if path.parent not in _unwritable:
            _unwritable.add(path.parent)
            warnings.warn(f"fxstream: cannot write the plan cache in {path.parent} ({e}); set {ENV} (or "
                          "Policy.cache_dir) to a writable folder, or Policy(cache_dir='') to turn the cache off",
                          RuntimeWarning, stacklevel=3)
        return
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    log.info("stored %s", path)


# -- the wrapper --------------------------------------------------------------------------------------------------
def replay(gm: GraphModule, made: MadeWith) -> CompiledGraph:
    """The one compile ``made`` describes, on ``gm``."""
    cg = compile_graph(gm, made.policy, made.counts, made.inner_counts, made.halo_keep, made.check_peak,
                       line_buffers=made.line_buffers is None,  # else set under the budget's ceiling below
                       norms=made.norms, cut_within=made.cut_within)  # NOTE [Split GroupNorms replayed]
    if made.in_flight is not None:
        set_in_flight(cg.graph_module, made.in_flight, made.policy.cpu_workers)
        cg.made_with = made
    if made.line_buffers is not None:
        set_line_buffers(cg.graph_module, made.line_buffers)
        cg.made_with = made
    return cg


def _remembered(bound, path: Path, record: dict):
    """``bound`` (a function computing the lower bound on demand) that also stores its value in the entry."""
    def compute() -> int:
        value = bound()
        store(path, dict(record, lower_bound_bytes=value))
        return value
    return compute


def compile_cached(gm: GraphModule, policy: Policy, weights: int) -> tuple[CompiledGraph, object]:
    """:func:`fxstream.budget.compile_for` through the plan cache: with ``max_memory`` and a cache folder, the
    decision stored under this graph's key is compiled once instead of the search (the search runs and its
    decision is stored where there is none, or where the stored one no longer holds); the same return values."""
    folder = cache_folder(policy)
    if folder is None or policy.max_memory is None:
        return compile_for(gm, policy, weights)
    key = plan_key(gm, policy, weights)
    path = folder / f"{key}.json"
    record = _stored_error(load(path), path, policy, weights)
    if record is not None:
        try:
            compiled = replay(gm, record["made_with"])
            peak = plan_memory(compiled.graph_module).peak_bytes
        except Exception as e:  # a decision this graph cannot take, whatever the error: the search decides again
            compiled, peak = None, f"none (its compile raised {type(e).__name__}: {e})"
        if compiled is not None and peak == record["peak_bytes"] and peak + weights <= policy.max_memory:
            log.info("cache hit %s", path)
            bound = record["lower_bound_bytes"]
            if bound is None:
                bound = _remembered(deferred_bound(gm, policy), path, _as_written(record))
            return compiled, bound
        _ignored(path, f"its decision plans {peak} bytes of activations, stored as {record['peak_bytes']}, with "
                       f"{weights} bytes of weights under max_memory={policy.max_memory}")
    try:
        compiled, bound = compile_for(gm, policy, weights)
    except MemoryBudgetError as e:
        store(path, _record(key, policy, error=e))
        raise
    record = _record(key, policy, compiled.made_with, plan_memory(compiled.graph_module).peak_bytes, bound)
    store(path, record)
    return compiled, (_remembered(bound, path, record) if callable(bound) else bound)


def _stored_error(record: dict | None, path: Path, policy: Policy, weights: int) -> dict | None:
    """A loaded entry that is a budget error for this budget and these weights: raised again (a cache hit); one
    for another budget: ignored with a warning (None). Any other entry, or none, returned as it is."""
    if record is None or record["error"] is None:
        return record
    e = record["error"]
    if e["max_memory"] == policy.max_memory and e["weight_bytes"] == weights:
        log.info("cache hit %s", path)
        raise MemoryBudgetError(e["message"], max_memory=e["max_memory"], weight_bytes=e["weight_bytes"],
                                lower_bound_bytes=e["lower_bound_bytes"])
    _ignored(path, "its budget error is for another budget or other weights")
    return None


def rank_budget_cached(gm: GraphModule, policy: Policy, weights: int, ranks: int, search, rank_peak) -> tuple:
    """NOTE [A budget per rank] through the plan cache: ``search()`` (``fxstream.entry.rank_budget``: many compiles,
    55 s for full-size SVD-XT on 4 ranks on 2 cores) runs once; its choice, the policy it compiled with, is stored
    under this graph's key and ``ranks``, and a later process compiles that policy once (through
    :func:`compile_cached`, as the search did). Checked as a budget's decision is: ``rank_peak(compiled)`` (the
    busiest rank's planned peak) must be the one stored and fit ``max_memory`` beside the weights; else a warning,
    the search, and the entry overwritten. A budget no rank plan meets is stored as its error and raised again.
    Returns what ``search()`` returns: (the policy compiled with, the compiled graph, its lower bound)."""
    folder = cache_folder(policy)
    if folder is None or policy.max_memory is None:
        return search()
    key = plan_key(gm, policy, weights, ranks=ranks)
    path = folder / f"{key}.json"
    record = _stored_error(load(path, _check_ranks), path, policy, weights)
    if record is not None:
        try:
            # the policy as compiled by the search: this process's cache folder (not stored) put back
            chosen = replace(record["compiled_with"], cache_dir=policy.cache_dir)
            compiled, bound = compile_cached(gm, chosen, weights)
            peak = rank_peak(compiled)
        except Exception as e:  # a choice this graph cannot take, whatever the error: the search decides again
            compiled, peak = None, f"none (its compile raised {type(e).__name__}: {e})"
        if compiled is not None and peak == record["rank_peak_bytes"] and peak + weights <= policy.max_memory:
            log.info("cache hit %s", path)
            return chosen, compiled, bound
        _ignored(path, f"its choice plans {peak} bytes of activations on the busiest rank, stored as "
                       f"{record['rank_peak_bytes']}, with {weights} bytes of weights under "
                       f"max_memory={policy.max_memory}")
    try:
        chosen, compiled, bound = search()
    except MemoryBudgetError as e:
        store(path, _record(key, policy, error=e))
        raise
    store(path, dict(_record(key, policy), ranks=ranks, compiled_with=_policy_json(chosen),
                     rank_peak_bytes=rank_peak(compiled)))
    return chosen, compiled, bound


def _as_written(record: dict) -> dict:
    """A checked entry (:func:`load`) as it is written (its ``made_with`` as JSON again)."""
    made = record["made_with"]
    return dict(record, made_with=_made_json(made) if isinstance(made, MadeWith) else made)
