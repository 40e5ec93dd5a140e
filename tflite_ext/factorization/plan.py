"""Which layers to factorize and at which rank: `plan(model, rank= | energy= | param_budget= |
mac_budget=)` returns a `Plan` (the report `factorize` prints) without building anything.

Candidates are Dense layers, 1×1 Conv1D/Conv2D ("channel" SVD) and k×k Conv2D ("spatial" SVD),
each with groups=1 and channels_last. Ranks are chosen:

- fixed: `rank=32` for every candidate, or `rank={"fc1": 32, "conv2": 8}`;
- by energy: the least rank whose singular values keep `energy` of the squared Frobenius norm;
- by a budget of the whole model's parameters or MACs: every candidate starts at the least
  rank, then ranks grow where they win back the most energy per parameter (or MAC) spent,
  until the next step would break the budget (a greedy knapsack: singular values fall, so each
  layer's next step wins less than its last).

A layer whose factorization would not save (R·(M+K) ≥ M·K) is left alone, with the reason.

Example:
    >>> p = plan(model, energy=0.9, round_to=8)
    >>> print(p)          # one row per candidate: rank, energy kept, params and MACs
    >>> p.ranks
    {'fc1': 48, 'fc2': 24}
"""
import dataclasses
import heapq
import math
import re

import keras
import numpy as np

from tflite_ext import wrapping
from tflite_ext.errors import InputError
from tflite_ext.factorization import svd
from tflite_ext.functional import FunctionalGraph, layer_matcher
from tflite_ext.pruning.macs import count_macs


@dataclasses.dataclass
class Row:
    """One candidate layer of a plan."""

    layer: str
    scheme: str           # "channel" or "spatial"
    kernel_shape: tuple
    max_rank: int
    rank: int | None      # None: left alone (see `note`)
    energy_kept: float    # of the squared singular values, at `rank` (1.0 when left alone)
    params: tuple         # (before, after) of the layer; after is two layers when factorized
    macs: tuple           # (before, after) of one inference, batch 1
    note: str = ""


@dataclasses.dataclass
class Plan:
    """The chosen ranks and what they cost: what `factorize` builds and prints."""

    rows: list
    model_params: tuple   # (before, after) of the whole model
    model_macs: tuple

    @property
    def ranks(self):
        """{layer name: rank} of the layers factorized: `factorize(model, rank=plan.ranks)`."""
        return {r.layer: r.rank for r in self.rows if r.rank is not None}

    def to_dict(self):
        return {"layers": [dataclasses.asdict(r) for r in self.rows],
                "model_params": list(self.model_params), "model_macs": list(self.model_macs)}

    def __str__(self):
        lines = [f"{'layer':24s} {'scheme':8s} {'kernel':18s} {'rank':>9s} {'energy':>7s} "
                 f"{'params':>21s} {'MACs':>25s}"]
        for r in self.rows:
            rank = f"{r.rank}/{r.max_rank}" if r.rank is not None else f"-/{r.max_rank}"
            lines.append(
                f"{r.layer:24s} {r.scheme:8s} {'x'.join(map(str, r.kernel_shape)):18s} "
                f"{rank:>9s} {r.energy_kept:7.4f} {r.params[0]:>10,}->{r.params[1]:<10,} "
                f"{r.macs[0]:>12,}->{r.macs[1]:<12,}" + (f" {r.note}" if r.note else ""))
        (p0, p1), (m0, m1) = self.model_params, self.model_macs
        lines.append(f"model: params {p0:,} -> {p1:,} ({p1 / p0:.1%}), "
                     f"MACs {m0:,} -> {m1:,} ({m1 / max(m0, 1):.1%})")
        return "\n".join(lines)


@dataclasses.dataclass
class _Candidate:
    name: str
    layer: object
    scheme: str
    shape: tuple          # of the kernel
    in_shape: tuple       # of the layer's input and output tensors (first call)
    out_shape: tuple
    calls: int            # nodes that call the layer (a shared layer costs MACs each time)
    s2: np.ndarray        # squared singular values, largest first

    @property
    def max_rank(self):
        return svd.max_rank(self.shape, self.scheme)

    def sides(self):
        """(rows, columns) of the kernel's matrix."""
        if self.scheme == "channel":
            return math.prod(self.shape[:-1]), self.shape[-1]
        kh, kw, cin, cout = self.shape
        return kh * cin, kw * cout

    def params(self, rank=None):
        """Kernel weights (bias excluded: it is the same either way) at `rank`, or unfactorized."""
        rows, cols = self.sides()
        return rows * cols if rank is None else rank * (rows + cols)

    def macs(self, rank=None):
        rows, cols = self.sides()
        out = _positions(self.out_shape)
        if rank is None:
            per_call = out * rows * cols
        elif self.scheme == "channel":  # the strides go on the first layer: both at the output
            per_call = out * rank * (rows + cols)
        else:  # the kh×1 conv runs at output rows × input columns (the strides split by axis)
            mid = self.out_shape[1] * self.in_shape[2]
            per_call = mid * rows * rank + out * rank * cols
        return self.calls * per_call

    def kept(self, rank):
        return float(self.s2[:rank].sum() / self.s2.sum()) if self.s2.sum() else 1.0


def scheme_of(layer):
    """"channel", "spatial", or the reason the layer is not a candidate (None if not a type
    that factorizes at all)."""
    if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)):
        return None
    if isinstance(layer, keras.layers.Dense):
        return "channel"
    cfg = layer.get_config()
    if cfg.get("groups", 1) != 1 or cfg.get("data_format", "channels_last") != "channels_last":
        return "not factorized: groups or channels_first"
    kernel = tuple(cfg["kernel_size"])
    if all(k == 1 for k in kernel):
        return "channel"
    if isinstance(layer, keras.layers.Conv2D):
        return "spatial"
    return "not factorized: a Conv1D wider than 1"


def _positions(shape):
    return math.prod(d for d in shape[1:-1] if d)


def candidates(model, layers=None):
    """The layers `factorize` may change, with their singular values ([_Candidate])."""
    graph = FunctionalGraph(model)
    wrapped = [n.layer.name for n in graph.nodes if isinstance(n.layer, wrapping.Wrapper)]
    if wrapped:
        raise InputError("factorize works on an ordinary model: strip pruning and clustering "
                         "first, and quantize_model after factorizing. Received a wrapped "
                         f"layer: {wrapped[0]!r}")
    chosen = layer_matcher(layers)
    named = [i for i in (layers if isinstance(layers, (list, tuple, set)) else [layers])
             if isinstance(i, str)]
    for pattern in named:  # a name that matches nothing is a typo, not "factorize nothing"
        if not any(re.fullmatch(pattern, n.layer.name) for n in graph.nodes):
            raise InputError(f"layers={pattern!r} matches no layer of model {model.name!r}. "
                             f"Layers: {', '.join(n.layer.name for n in graph.nodes)}")
    calls = {}
    for node in graph.nodes:
        calls[id(node.layer)] = calls.get(id(node.layer), 0) + 1
    found, seen = [], set()
    for node in graph.nodes:
        layer = node.layer
        if not node.inputs or id(layer) in seen or not chosen(layer):
            continue
        seen.add(id(layer))
        scheme = scheme_of(layer)
        if scheme not in ("channel", "spatial"):
            if scheme and layer.name in named:
                why = scheme.removeprefix("not factorized: ")
                raise InputError(f"Layer {layer.name!r} cannot be factorized ({why}): leave it "
                                 f"out of layers=. Received: layers={layers!r}")
            continue
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        found.append(_Candidate(
            layer.name, layer, scheme, kernel.shape, tuple(graph.shapes[node.inputs[0]]),
            tuple(graph.shapes[node.outputs[0]]), calls[id(layer)],
            svd.singular_values(kernel, scheme) ** 2))
    if not found:
        raise InputError(f"Nothing to factorize in model {model.name!r}: factorize takes Dense, "
                         "1x1 Conv1D/Conv2D and kxk Conv2D layers (groups=1, channels_last)"
                         + (f" among layers={layers!r}" if layers is not None else ""))
    return found


def _round_up(rank, round_to, limit):
    return min(-(-rank // round_to) * round_to, limit)


def _check_number(name, value, low, high, low_open=True):
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise InputError(f"{name} must be a number in {bounds}. Received: {name}={value!r}")


def _fixed_ranks(cands, rank):
    if isinstance(rank, dict):
        names = {c.name for c in cands}
        missing = sorted(set(rank) - names)
        if missing:
            raise InputError(f"rank names a layer that is not a factorization candidate: "
                             f"{missing[0]!r}. Candidates: {', '.join(sorted(names))}")
        cands = [c for c in cands if c.name in rank]
        wanted = rank
    else:
        wanted = {c.name: rank for c in cands}
    ranks = {}
    for c in cands:
        r = wanted[c.name]
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
            raise InputError(f"rank must be a whole number > 0. Received: rank={r!r} for layer "
                             f"{c.name!r}")
        if r > c.max_rank:
            raise InputError(f"rank={r} is larger than layer {c.name!r} allows (at most "
                             f"{c.max_rank} for its {c.scheme} SVD of kernel "
                             f"{'x'.join(map(str, c.shape))}); pass a smaller rank, a dict "
                             "of ranks or layers=...")
        ranks[c.name] = int(r)
    return ranks


def _energy_ranks(cands, energy, round_to):
    ranks = {}
    for c in cands:
        cumulative = np.cumsum(c.s2) / max(c.s2.sum(), np.finfo(float).tiny)
        least = int(np.searchsorted(cumulative, energy - 1e-12) + 1)
        ranks[c.name] = _round_up(least, round_to, c.max_rank)
    return ranks


def _steps(c, round_to):
    """The ranks that save, in growing order (multiples of round_to)."""
    return [r for r in range(round_to, c.max_rank + 1, round_to) if c.params(r) < c.params()]


def _budget_ranks(cands, budget, total, cost, what, round_to):
    """Greedy: least ranks first, then grow by the most energy won per unit of cost."""
    steps = {c.name: _steps(c, round_to) for c in cands}
    cands = [c for c in cands if steps[c.name]]
    state = {c.name: 0 for c in cands}  # index into steps; len(steps) means unfactorized
    spent = total - sum(cost(c, None) - cost(c, steps[c.name][0]) for c in cands)
    if not cands or spent > budget:
        raise InputError(f"{what}={budget:,} cannot be met by factorization: every candidate "
                         f"at its least rank ({round_to}) leaves {spent:,}, the least reachable.")

    def next_step(c):
        i, ranks = state[c.name], steps[c.name]
        rank, nxt = ranks[i], ranks[i + 1] if i + 1 < len(ranks) else None
        extra = cost(c, nxt) - cost(c, rank)
        won = c.kept(nxt if nxt else c.max_rank) - c.kept(rank)
        return (-won / max(extra, 1), c.name, extra)

    by_name = {c.name: c for c in cands}
    heap = [next_step(c) for c in cands]
    heapq.heapify(heap)
    while heap:
        _, name, extra = heapq.heappop(heap)
        if spent + extra > budget:
            continue  # this layer stays where it is; its later steps come after this one
        spent += extra
        state[name] += 1
        if state[name] < len(steps[name]):
            heapq.heappush(heap, next_step(by_name[name]))
    return {n: steps[n][i] for n, i in state.items() if i < len(steps[n])}


def _budget(name, value, total):
    """An absolute budget from an int, or from a fraction of `total` in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
            or (isinstance(value, float) and value > 1):
        raise InputError(f"{name} must be a whole count > 0 or a fraction in (0, 1] of the "
                         f"model's {total:,}. Received: {name}={value!r}")
    return int(value * total) if isinstance(value, float) else int(value)


def plan(model, rank=None, energy=None, param_budget=None, mac_budget=None, layers=None,
         round_to=1, skip_unprofitable=True):
    """The ranks `factorize` would use, and what they cost (see the module docstring).

    Args:
        model: a functional or Sequential Keras model (no wrappers).
        rank: an int for every candidate, or {layer name: int}.
        energy: kept fraction of the squared singular values, in (0, 1].
        param_budget, mac_budget: the whole model's parameters or MACs after factorization:
            a count, or a float in (0, 1] for a fraction of today's.
        layers: which layers may be factorized: names, a regex on names or a callable.
        round_to: chosen ranks (by energy or budget) are multiples of this, for SIMD kernels.
        skip_unprofitable: leave alone a layer whose factorization would not save (set False
            to factorize anyway, e.g. to check that full rank is exact).

    Raises:
        InputError: none or several of rank/energy/budgets, a bad value, nothing to
            factorize, or a budget no factorization can meet (naming the least reachable).
    """
    given = {k: v for k, v in dict(rank=rank, energy=energy, param_budget=param_budget,
                                   mac_budget=mac_budget).items() if v is not None}
    if len(given) != 1:
        raise InputError("Pass exactly one of rank, energy, param_budget, mac_budget. "
                         f"Received: {', '.join(given) or 'none'}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InputError(f"round_to must be a whole number >= 1. Received: round_to={round_to!r}")
    cands = candidates(model, layers)
    params, macs = model.count_params(), count_macs(model)
    if rank is not None:
        ranks = _fixed_ranks(cands, rank)
    elif energy is not None:
        _check_number("energy", energy, 0, 1)
        ranks = _energy_ranks(cands, energy, round_to)
    elif param_budget is not None:
        ranks = _budget_ranks(cands, _budget("param_budget", param_budget, params), params,
                              lambda c, r: c.params(r), "param_budget", round_to)
    else:
        ranks = _budget_ranks(cands, _budget("mac_budget", mac_budget, macs), macs,
                              lambda c, r: c.macs(r), "mac_budget", round_to)
    rows = []
    for c in cands:
        r, note = ranks.get(c.name), ""
        if r is not None and skip_unprofitable and c.params(r) >= c.params():
            note = (f"left alone: rank {r} would not save ({r}x({'+'.join(map(str, c.sides()))})"
                    f" >= {c.params():,} weights)")
            r = None
        elif r is None:
            note = ("left alone: not in rank" if isinstance(rank, dict)
                    else "left alone: no rank saves" if not _steps(c, round_to)
                    else "left alone: the budget is met")
        bias = c.layer.bias.shape[0] if getattr(c.layer, "use_bias", False) else 0
        rows.append(Row(c.name, c.scheme, c.shape, c.max_rank, r,
                        c.kept(r) if r is not None else 1.0,
                        (c.params() + bias, c.params(r) + bias if r else c.params() + bias),
                        (c.macs(), c.macs(r) if r else c.macs()), note))
    saved_params = sum(r.params[0] - r.params[1] for r in rows)
    saved_macs = sum(r.macs[0] - r.macs[1] for r in rows)
    return Plan(rows, (params, params - saved_params), (macs, macs - saved_macs))
