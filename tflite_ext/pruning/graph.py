"""The channel-dependency graph of a Keras 3 functional (or Sequential) model.

Structured pruning must remove the *same* channels from every layer that shares them: a conv's
output channels are the next conv's input channels, BatchNormalization and depthwise convs carry
them through, residual `Add` ties all branches together, `Concatenate` places each branch at an
offset and `Flatten` expands one channel into one feature per spatial position. This module
finds those ties (the DepGraph idea of Torch-Pruning, written for Keras functional graphs), on
the walk of `tflite_ext.functional`.

Each tensor gets a *channel map*: the list of channel *spaces* its last axis is made of. A
producer (Conv, Dense, SeparableConv) starts a new space; element-wise ops union spaces; a
space that reaches a model output, a model input or a layer that mixes channels in unknown
ways (a "barrier", e.g. LayerNormalization) is blocked. Every unblocked space is a `Group`:
the unit that importance scores and pruning masks work on. Which rule a layer follows is its
handler's (`pruning.handlers`); the project's wrappers are looked through.

`graph_of(model)` builds the graph once per model and hands the same one to `prune`, the
pruning plan, `count_macs` and `strip`.

Example:
    >>> from tflite_ext import models
    >>> g = graph_of(models.resnet8())
    >>> [(grp.size, grp.producers) for grp in g.groups][:2]   # the identity add ties 2 convs
    [(16, ['stem_conv', 's1b_conv']), (16, ['s1a_conv'])]
"""
import dataclasses
import math
import weakref

import keras
import numpy as np

from tflite_ext.errors import UnsupportedLayerError
from tflite_ext.functional import FunctionalGraph
from tflite_ext.pruning import handlers
from tflite_ext.pruning.handlers import BARRIER, handler_for
from tflite_ext.wrapping import unwrap

# ----------------------------------------------------------------------------- channel maps
# A channel map is a tuple of blocks; a block is (segments, repeat) where segments is a tuple
# of (space_id, size) laid out along the channel axis, and repeat > 1 means the block was
# flattened from `repeat` spatial positions (feature f -> channel f % block_channels).


def _block_channels(block):
    return sum(size for _, size in block[0])


def map_width(cmap):
    """Number of features of the last axis described by `cmap`."""
    return sum(_block_channels(b) * b[1] for b in cmap)


def _expand(cmap):
    """Per-feature arrays (space_id, channel_in_space) for a channel map."""
    spaces, chans = [], []
    for segments, repeat in cmap:
        s = np.concatenate([np.full(size, sid, np.int64) for sid, size in segments])
        c = np.concatenate([np.arange(size, dtype=np.int64) for _, size in segments])
        spaces.append(np.tile(s, repeat))
        chans.append(np.tile(c, repeat))
    return np.concatenate(spaces), np.concatenate(chans)


@dataclasses.dataclass
class Group:
    """A set of tied channels: pruning channel i removes it from every member.

    Attributes:
        id: the space id (index into DependencyGraph masks).
        size: number of channels.
        producers: node names whose output channels are this group.
        consumers: (node name, feature indices, channel indices): input features of
            channel-mixing layers fed by this group.
        carriers: (node name, layer channel indices, channel indices): per-channel layers
            with weights that carry the group (BatchNormalization, depthwise conv, PReLU).
    """

    id: int
    size: int
    producers: list = dataclasses.field(default_factory=list)
    consumers: list = dataclasses.field(default_factory=list)
    carriers: list = dataclasses.field(default_factory=list)


class DependencyGraph(FunctionalGraph):
    """Groups of tied channels of a functional/Sequential Keras model.

    Args:
        model: a functional or Sequential `keras.Model` (pruning wrappers are looked through;
            models nested as layers are flattened).
        opaque: layer names to treat as barriers (nothing on either side is pruned); the way
            to exclude a layer type the graph does not know.

    Attributes (beside `FunctionalGraph`'s):
        groups: prunable `Group`s, in graph order.
        group_by_id: {group id: Group}.
        opaque: the names treated as barriers.

    Example:
        >>> g = DependencyGraph(keras.applications.MobileNetV2(weights=None))
        >>> len(g.groups) > 10
        True
    """

    def __init__(self, model, opaque=()):
        super().__init__(model)
        self.opaque = set(opaque)
        self._parent, self._size, self._blocked = [], [], []
        self.maps = {}
        self._origin = {}
        self._propagate()
        self._build_groups()

    # -- union-find over channel spaces
    def _new_space(self, size, blocked, origin=None):
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._blocked.append(blocked)
        if origin is not None:
            self._origin[len(self._parent) - 1] = origin
        return len(self._parent) - 1

    def find(self, s):
        """Root of space `s`."""
        parent = self._parent
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    def _union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self._parent[b] = a
            self._blocked[a] = self._blocked[a] or self._blocked[b]

    def _block(self, cmap):
        for segments, _ in cmap:
            for sid, _ in segments:
                self._blocked[self.find(sid)] = True

    def width(self, tid):
        """Size of the last axis of tensor `tid`, or None if unknown."""
        shape = self.shapes.get(tid)
        if shape is None or len(shape) < 2 or shape[-1] is None:
            return None
        return int(shape[-1])

    def _fresh(self, tid, blocked, origin=None):
        width = self.width(tid)
        if width is None:
            return ()
        return ((((self._new_space(width, blocked, origin), width),), 1),)

    def _propagate(self):
        first_call = {}  # id(layer): its first node
        for node in self.nodes:
            if not node.inputs:  # model input
                node.kind = "input"
                self.maps[node.outputs[0]] = self._fresh(node.outputs[0], True)
                continue
            handler = handler_for(node.layer)
            if node.layer.name in self.opaque or node.name in self.opaque:
                handler = BARRIER
            if handler is None and not isinstance(node.layer, keras.layers.Layer):
                handler = handlers.op_handler(node.layer, [node.args, node.kwargs],
                                              [self.shapes.get(t) for t in node.inputs],
                                              self.shapes.get(node.outputs[0]))
            if handler is None and not isinstance(node.layer, keras.layers.Layer):
                raise UnsupportedLayerError(
                    f"The channel graph does not see into the Keras op '{node.name}' "
                    f"({type(node.layer).__name__}, an expression such as x * 0.5 in the "
                    f"model): exclude it with opaque=['{node.name}'] or write it as a layer "
                    "(keras.layers.Multiply, Add, Rescaling...).")
            if handler is None:
                inner = unwrap(node.layer)
                raise UnsupportedLayerError(
                    f"The channel graph does not know layer '{node.name}' "
                    f"({type(inner).__name__}): exclude it with opaque=['{node.name}'] or opt "
                    "it in with tflite_ext.pruning.register_handler("
                    f"{type(inner).__name__}, tflite_ext.pruning.PASS_THROUGH).")
            rank = len(self.shapes.get(node.inputs[0], ()))
            kind = handler.check(unwrap(node.layer), rank)
            in_maps = [self.maps.get(t, ()) for t in node.inputs]
            out = node.outputs[0]
            kind = self._apply(node, kind, in_maps, out)
            node.kind = kind
            earlier = first_call.setdefault(id(node.layer), node)
            if earlier is not node and _has_weights(node.layer):
                self._tie(earlier, node)
        for tid in self.outputs:
            self._block(self.maps.get(tid, ()))

    def _tie(self, a, b):
        """A layer called twice has one set of weights: its channels at both calls are the
        same channels (a siamese tower, a shared conv), or none of them is pruned."""
        for ta, tb in zip(a.inputs + a.outputs[:1], b.inputs + b.outputs[:1]):
            ma, mb = self.maps.get(ta, ()), self.maps.get(tb, ())
            if _same_structure(ma, mb):
                for (sa, _), (sb, _) in _pairs(ma, mb):
                    self._union(sa, sb)
            else:
                self._block(ma)
                self._block(mb)

    def _apply(self, node, kind, in_maps, out):
        first = in_maps[0] if in_maps else ()
        if kind in ("pass_through", "flatten", "reshape") and map_width(first) != self.width(
                node.inputs[0]):
            kind = "barrier"  # channel axis unknown or already reshaped: stay safe
        if kind == "reshape":
            target = node.layer.get_config().get("target_shape")
            if len(target) == 1:
                kind = "flatten"
            elif target[-1] == self.width(node.inputs[0]):
                kind = "pass_through"
            else:
                kind = "barrier"
        if kind == "producer":
            self.maps[out] = self._fresh(out, False, node.name)
        elif kind == "pass_through":
            self.maps[out] = first
        elif kind == "merge":
            ok = all(_same_structure(first, m) for m in in_maps[1:])
            if ok:
                for m in in_maps[1:]:
                    for (sa, _), (sb, _) in _pairs(first, m):
                        self._union(sa, sb)
                self.maps[out] = first
            else:
                for m in in_maps:
                    self._block(m)
                self.maps[out] = self._fresh(out, True)
        elif kind == "concat":
            axis = node.layer.get_config().get("axis", -1)
            rank = len(self.shapes.get(out, ()))
            if axis in (-1, rank - 1) and all(m for m in in_maps):
                blocks = []
                for m in in_maps:
                    for seg, rep in m:
                        if blocks and rep == 1 and blocks[-1][1] == 1:
                            blocks[-1] = (blocks[-1][0] + seg, 1)
                        else:
                            blocks.append((seg, rep))
                self.maps[out] = tuple(blocks)
            else:
                kind = "merge"
                return self._apply(node, kind, in_maps, out)
        elif kind == "flatten":
            shape = self.shapes.get(node.inputs[0])
            spatial = shape[1:-1]
            if len(first) == 1 and first[0][1] == 1 and all(d is not None for d in spatial):
                self.maps[out] = ((first[0][0], int(math.prod(spatial))),)
            elif not spatial:
                self.maps[out] = first
            else:
                self._block(first)
                self.maps[out] = self._fresh(out, True)
                kind = "barrier"
        else:  # barrier
            for m in in_maps:
                self._block(m)
            self.maps[out] = self._fresh(out, True)
            kind = "barrier"
        return kind

    def _build_groups(self):
        groups = {}
        for sid in range(len(self._parent)):
            root = self.find(sid)
            if not self._blocked[root] and root not in groups:
                groups[root] = Group(root, self._size[root])
        self.space_root = np.array([self.find(s) for s in range(len(self._parent))], np.int64)
        for sid, origin in self._origin.items():
            root = self.find(sid)
            if root in groups:
                groups[root].producers.append(origin)
        for node in self.nodes:
            if node.kind not in ("producer", "pass_through") or not node.inputs:
                continue
            if node.kind == "pass_through" and not _has_weights(node.layer):
                continue
            for root, fidx, cidx in self.input_index(node.name):
                if root not in groups:
                    continue
                target = groups[root].consumers if node.kind == "producer" else \
                    groups[root].carriers
                target.append((node.name, fidx, cidx))
        self.groups = [groups[r] for r in sorted(groups)]
        self.group_by_id = {g.id: g for g in self.groups}

    def input_index(self, node_name, position=0):
        """[(root space, feature indices, channel indices)] of a node's input tensor."""
        node = self.node_by_name[node_name]
        return self.index_of(node.inputs[position])

    def index_of(self, tid):
        """[(root space, feature indices, channel indices)] for tensor `tid`."""
        cmap = self.maps.get(tid, ())
        if not cmap:
            return []
        spaces, chans = _expand(cmap)
        roots = self.space_root[spaces]
        out = []
        for root in np.unique(roots):
            fidx = np.nonzero(roots == root)[0]
            out.append((int(root), fidx, chans[fidx]))
        return out

    def keep_mask(self, tid, group_keep):
        """Boolean per-feature mask of tensor `tid` given {group id: bool array}."""
        width = self.width(tid)
        keep = np.ones(width if width is not None else 0, bool)
        for root, fidx, cidx in self.index_of(tid):
            if root in group_keep:
                keep[fidx] = group_keep[root][cidx]
        return keep


def _has_weights(layer):
    return bool(getattr(layer, "weights", None))  # a Keras op has none


def _same_structure(a, b):
    if len(a) != len(b):
        return False
    for (sa, ra), (sb, rb) in zip(a, b):
        if ra != rb or [s for _, s in sa] != [s for _, s in sb]:
            return False
    return True


def _pairs(a, b):
    for (sa, _), (sb, _) in zip(a, b):
        yield from zip(sa, sb)


# {model: (key, graph)}: the graph of a model is built once. Weak keys let a model go; the key
# (its layers, opaque, the handler table's generation) catches a Sequential model that gained
# layers and a handler registered since.
_GRAPHS = weakref.WeakKeyDictionary()


def graph_of(model, opaque=()):
    """The `DependencyGraph` of `model`, built on first use and then reused.

    `prune`, the pruning plan, `count_macs` and `strip` all ask here, so a model's graph is
    built once per model (a pruned or stripped model is a new model with a graph of its own).
    """
    if not isinstance(model, keras.Model):  # not cached: the walk says what is wrong with it
        return DependencyGraph(model, opaque)
    key = (tuple(map(id, model.layers)), frozenset(opaque), handlers.generation())
    cached = _GRAPHS.get(model)
    if cached is None or cached[0] != key:
        cached = _GRAPHS[model] = (key, DependencyGraph(model, opaque))
    return cached[1]
