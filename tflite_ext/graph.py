"""The channel-dependency graph of a Keras 3 functional (or Sequential) model.

Structured pruning must remove the *same* channels from every layer that shares them: a conv's
output channels are the next conv's input channels, BatchNormalization and depthwise convs carry
them through, residual `Add` ties all branches together, `Concatenate` places each branch at an
offset and `Flatten` expands one channel into one feature per spatial position. This module
finds those ties (the DepGraph idea of Torch-Pruning, written for Keras functional graphs).

Each tensor gets a *channel map*: the list of channel *spaces* its last axis is made of. A
producer (Conv, Dense, SeparableConv) starts a new space; element-wise ops union spaces; a
space that reaches a model output, a model input or a layer that mixes channels in unknown
ways (a "barrier", e.g. LayerNormalization) is blocked. Every unblocked space is a `Group`:
the unit that importance scores and pruning masks work on.

All layer knowledge lives in `HANDLERS` (module `tflite_ext.graph_handlers`, re-exported
here), a table from layer class to a small handler; wrappers are looked through. A custom layer
opts in with `register_handler(MyLayer, PASS_THROUGH)` (or `BARRIER`), or by defining
`tflite_ext_channel_rule = "pass_through"` (or `"barrier"`) on its class.

Example:
    >>> from tflite_ext import graph, models
    >>> g = graph.DependencyGraph(models.resnet8())
    >>> [(grp.size, grp.producers) for grp in g.groups][:2]   # the identity add ties 2 convs
    [(16, ['stem_conv', 's1b_conv']), (16, ['s1a_conv'])]
"""
import dataclasses
import math

import keras
import numpy as np

from tflite_ext.errors import InputError, UnsupportedLayerError
# The handler table lives in its own module; re-exported here (the public import path).
from tflite_ext.graph_handlers import (BARRIER, HANDLERS, PASS_THROUGH, Handler,  # noqa: F401
                                       handler_for, register_handler, unwrap)

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


# ----------------------------------------------------------------------------- graph nodes


@dataclasses.dataclass
class Node:
    """One call of one layer in the (flattened) functional graph."""

    name: str              # unique node name: layer name (prefixed inside nested models)
    layer: object          # the live Keras layer (possibly a pruning wrapper)
    args: list             # call args, tensors replaced by {"__tensor__": tensor_id}
    kwargs: dict
    inputs: list           # tensor ids, flat
    outputs: list          # tensor ids, flat
    kind: str = ""


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


def _is_model(layer):
    return isinstance(layer, keras.Model)


def _functional_config(model):
    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "inputs", None):
            raise InputError(
                "The Sequential model must be built with a known input shape (add keras.Input "
                f"or call it once). Received: model={model.name}")
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    try:
        config = model.get_config()
        ok = isinstance(config, dict) and "layers" in config and "output_layers" in config
    except Exception:  # noqa: BLE001 - subclassed models may raise in get_config
        ok = False
    if not ok:
        raise InputError(
            "The model must be a functional or Sequential Keras model; a subclassed model has "
            f"no graph to prune. Received: model={type(model).__name__}")
    return model, config


def _refs(spec):
    """Normalizes config input/output layer specs to a list of [name, node, tensor]."""
    if len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], int):
        return [spec]
    out = []
    for item in spec:
        out.extend(_refs(item))
    return out


def _map_tensors(obj, fn):
    """Replaces serialized Keras tensors inside a JSON-like structure with fn(history)."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return fn(obj["config"]["keras_history"], obj["config"]["shape"])
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def _flat_tensors(obj, out):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            out.append(obj["__tensor__"])
        else:
            for v in obj.values():
                _flat_tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _flat_tensors(v, out)
    return out


class _Collector:
    """Flattens a functional model (and models nested as layers) into a list of Nodes."""

    def __init__(self):
        self.nodes = []
        self.alias = {}
        self.shapes = {}
        self.input_ids = []

    def resolve(self, tid):
        while tid in self.alias:
            tid = self.alias[tid]
        return tid

    def collect(self, model, prefix="", bound_inputs=None):
        model, config = _functional_config(model)
        tid = lambda h: f"{prefix}{h[0]}:{h[1]}:{h[2]}"  # noqa: E731

        def to_ref(history, shape):
            self.shapes.setdefault(tid(history), tuple(shape))
            return {"__tensor__": tid(history)}

        in_refs = _refs(config["input_layers"])
        for i, ref in enumerate(in_refs):
            if bound_inputs is None:
                layer = model.get_layer(ref[0])
                self.input_ids.append(tid(ref))
                self.nodes.append(Node(f"{prefix}{ref[0]}", layer, [], {}, [], [tid(ref)]))
                self.shapes[tid(ref)] = tuple(model.inputs[i].shape)
            else:
                self.alias[tid(ref)] = bound_inputs[i]
        for lcfg in config["layers"]:
            if lcfg["class_name"] == "InputLayer" or not lcfg.get("inbound_nodes"):
                continue
            layer = model.get_layer(lcfg["name"])
            for k, inbound in enumerate(lcfg["inbound_nodes"]):
                args = _map_tensors(inbound.get("args", []), to_ref)
                kwargs = _map_tensors(inbound.get("kwargs", {}), to_ref)
                inputs = _flat_tensors([args, kwargs], [])
                name = f"{prefix}{lcfg['name']}" + (f"#{k}" if k else "")
                if _is_model(layer):
                    inner_out = self.collect(layer, f"{name}/", inputs)
                    for t, out_id in enumerate(inner_out):
                        self.alias[f"{prefix}{lcfg['name']}:{k}:{t}"] = out_id
                    continue
                outputs = [f"{prefix}{lcfg['name']}:{k}:0"]
                self.nodes.append(Node(name, layer, args, kwargs, inputs, outputs))
        out_ids = [tid(ref) for ref in _refs(config["output_layers"])]
        if bound_inputs is None:
            for ref, tensor in zip(out_ids, model.outputs):
                self.shapes.setdefault(ref, tuple(tensor.shape))
        return out_ids


class DependencyGraph:
    """Groups of tied channels of a functional/Sequential Keras model.

    Args:
        model: a functional or Sequential `keras.Model` (pruning wrappers are looked through;
            models nested as layers are flattened).
        opaque: layer names to treat as barriers (nothing on either side is pruned); the way
            to exclude a layer type the graph does not know.

    Attributes:
        nodes: `Node`s in topological order.
        groups: prunable `Group`s, in graph order.
        outputs: the model's output tensor ids.

    Example:
        >>> g = DependencyGraph(keras.applications.MobileNetV2(weights=None))
        >>> len(g.groups) > 10
        True
    """

    def __init__(self, model, opaque=()):
        col = _Collector()
        self.outputs = col.collect(model)
        self.model = model
        self.opaque = set(opaque)
        for node in col.nodes:
            node.inputs = [col.resolve(t) for t in node.inputs]
            node.args = _resolve_refs(node.args, col.resolve)
            node.kwargs = _resolve_refs(node.kwargs, col.resolve)
        self.outputs = [col.resolve(t) for t in self.outputs]
        self.input_ids = col.input_ids
        self.shapes = {col.resolve(k): v for k, v in col.shapes.items()}
        self.nodes = _topological(col.nodes)
        self.node_by_name = {n.name: n for n in self.nodes}
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

    def _width(self, tid):
        shape = self.shapes.get(tid)
        if shape is None or len(shape) < 2 or shape[-1] is None:
            return None
        return int(shape[-1])

    def _fresh(self, tid, blocked, origin=None):
        width = self._width(tid)
        if width is None:
            return ()
        return ((((self._new_space(width, blocked, origin), width),), 1),)

    def _propagate(self):
        for node in self.nodes:
            if not node.inputs:  # model input
                node.kind = "input"
                self.maps[node.outputs[0]] = self._fresh(node.outputs[0], True)
                continue
            handler = handler_for(node.layer)
            if node.layer.name in self.opaque or node.name in self.opaque:
                handler = BARRIER
            if handler is None:
                inner = unwrap(node.layer)
                raise UnsupportedLayerError(
                    f"The channel graph does not know layer '{node.name}' "
                    f"({type(inner).__name__}): exclude it with opaque=['{node.name}'] or opt "
                    "it in with tflite_ext.graph.register_handler("
                    f"{type(inner).__name__}, tflite_ext.graph.PASS_THROUGH).")
            rank = len(self.shapes.get(node.inputs[0], ()))
            kind = handler.check(unwrap(node.layer), rank)
            in_maps = [self.maps.get(t, ()) for t in node.inputs]
            out = node.outputs[0]
            kind = self._apply(node, kind, in_maps, out)
            node.kind = kind
        for tid in self.outputs:
            self._block(self.maps.get(tid, ()))

    def _apply(self, node, kind, in_maps, out):
        first = in_maps[0] if in_maps else ()
        if kind in ("pass_through", "flatten", "reshape") and map_width(first) != self._width(
                node.inputs[0]):
            kind = "barrier"  # channel axis unknown or already reshaped: stay safe
        if kind == "reshape":
            target = node.layer.get_config().get("target_shape")
            if len(target) == 1:
                kind = "flatten"
            elif target[-1] == self._width(node.inputs[0]):
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
        width = self._width(tid)
        keep = np.ones(width if width is not None else 0, bool)
        for root, fidx, cidx in self.index_of(tid):
            if root in group_keep:
                keep[fidx] = group_keep[root][cidx]
        return keep


def _has_weights(layer):
    return bool(layer.weights)


def _resolve_refs(obj, resolve):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return {"__tensor__": resolve(obj["__tensor__"])}
        return {k: _resolve_refs(v, resolve) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_refs(v, resolve) for v in obj]
    return obj


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


def _topological(nodes):
    produced = {t: i for i, n in enumerate(nodes) for t in n.outputs}
    deps = [{produced[t] for t in n.inputs if t in produced} for n in nodes]
    order, done = [], set()
    for i in range(len(nodes)):
        stack = [(i, False)]
        while stack:
            j, expanded = stack.pop()
            if j in done:
                continue
            if expanded:
                done.add(j)
                order.append(nodes[j])
                continue
            stack.append((j, True))
            stack.extend((d, False) for d in deps[j] if d not in done)
    return order
