"""The walk over a functional (or Sequential) Keras model, and its rebuild with new layers.

`FunctionalGraph(model)` flattens the model (models nested as layers included) into `Node`s
in topological order, each a call of one layer on tensor ids. `rebuild(graph, make_layer)`
builds a new functional model node by node from new layers. Pruning (`prune`, `strip`, the
channel graph) and QAT (`quantize_model`) both stand on these two: one walk, one rebuild.

Example:
    >>> g = FunctionalGraph(models.digits_cnn())
    >>> [n.layer.name for n in g.nodes][:3]
    ['input_layer', 'conv1', 'bn1']
    >>> copy = rebuild(g, lambda node: (clone_layer(node.layer), None))
"""
import dataclasses
import os
import re

import keras

from tflite_ext import wrapping
from tflite_ext.errors import InputError


@dataclasses.dataclass
class Node:
    """One call of one layer in the (flattened) functional graph."""

    name: str              # unique node name: layer name (prefixed inside nested models)
    layer: object          # the live Keras layer (possibly a wrapper)
    args: list             # call args, tensors replaced by {"__tensor__": tensor_id}
    kwargs: dict
    inputs: list           # tensor ids, flat
    outputs: list          # tensor ids, flat
    kind: str = ""         # the channel rule the dependency graph found (pruning.graph)


def as_functional(model, what="The model"):
    """(functional model, its config); Sequential becomes functional; one-line errors else."""
    if isinstance(model, (str, os.PathLike)):
        raise InputError(
            f"{what} must be a keras.Model, not a path: load a .keras or .h5 file with "
            "keras.saving.load_model (a SavedModel has no Keras graph to walk; "
            f"convert.to_tflite takes it as it is). Received: model={str(model)!r}")
    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "inputs", None):
            raise InputError(
                f"{what} must be a built Sequential model (start it with keras.Input). "
                f"Received: model={model.name} (not built)")
        # A single input as the tensor, not a list: Keras warns on every call when the
        # structure differs from the Sequential's own ("Expected: ['input_layer']").
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
        model = keras.Model(inputs, outputs, name=model.name)
    try:
        config = model.get_config()
        ok = isinstance(config, dict) and "layers" in config and "output_layers" in config
    except Exception:  # noqa: BLE001 - subclassed models may raise in get_config
        ok = False
    if not ok:
        raise InputError(
            f"{what} must be a functional or Sequential Keras model; a subclassed model has "
            f"no graph to walk. Received: model={type(model).__name__}")
    return model, config


def _refs(spec):
    """Config input/output layer specs as a flat list of [name, node, tensor], in the order
    of `model.inputs`/`model.outputs` (keras.tree: dict values by sorted key)."""
    if len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], int):
        return [spec]
    items = [spec[k] for k in sorted(spec)] if isinstance(spec, dict) else spec
    return [ref for item in items for ref in _refs(item)]


def _map_tensors(obj, fn):
    """Replaces serialized Keras tensors inside a JSON-like structure with fn(history)."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return fn(obj["config"]["keras_history"], obj["config"]["shape"])
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def _tensor_ids(obj, out):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            out.append(obj["__tensor__"])
        else:
            for v in obj.values():
                _tensor_ids(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensor_ids(v, out)
    return out


def substitute(obj, tensors):
    """`obj` (node args/kwargs) with every {"__tensor__": id} replaced by `tensors[id]`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: substitute(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, tensors) for v in obj]
    return obj


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
        model, config = as_functional(model)
        tid = lambda h: f"{prefix}{h[0]}:{h[1]}:{h[2]}"  # noqa: E731
        # Layers and the Keras ops written as expressions (x * 0.5), which are no layers.
        by_name = {op.name: op for op in model.operations}

        def to_ref(history, shape):
            self.shapes.setdefault(tid(history), tuple(shape))
            return {"__tensor__": tid(history)}

        for i, ref in enumerate(_refs(config["input_layers"])):
            if bound_inputs is None:
                self.input_ids.append(tid(ref))
                self.nodes.append(Node(f"{prefix}{ref[0]}", by_name[ref[0]], [], {}, [],
                                       [tid(ref)]))
                self.shapes[tid(ref)] = tuple(model.inputs[i].shape)
            else:
                self.alias[tid(ref)] = bound_inputs[i]
        own = []
        for lcfg in config["layers"]:
            if lcfg["class_name"] == "InputLayer" or not lcfg.get("inbound_nodes"):
                continue
            layer = by_name[lcfg["name"]]
            for k, inbound in enumerate(lcfg["inbound_nodes"]):
                args = _map_tensors(inbound.get("args", []), to_ref)
                kwargs = _map_tensors(inbound.get("kwargs", {}), to_ref)
                inputs = _tensor_ids([args, kwargs], [])
                name = f"{prefix}{lcfg['name']}" + (f"#{k}" if k else "")
                if isinstance(layer, keras.Model):
                    inner_out = self.collect(layer, f"{name}/", inputs)
                    for t, out_id in enumerate(inner_out):
                        self.alias[f"{prefix}{lcfg['name']}:{k}:{t}"] = out_id
                    continue
                node = Node(name, layer, args, kwargs, inputs, [f"{prefix}{lcfg['name']}:{k}:"])
                self.nodes.append(node)
                own.append(node)
        out_ids = [tid(ref) for ref in _refs(config["output_layers"])]
        if bound_inputs is None:
            for ref, tensor in zip(out_ids, model.outputs):
                self.shapes.setdefault(ref, tuple(tensor.shape))
        # A layer's outputs are every index anything refers to (a layer may return several).
        used = set(self.shapes) | set(out_ids)
        for node in own:
            stem = node.outputs[0]
            count = 1 + max([int(t[len(stem):]) for t in used if t.startswith(stem)], default=0)
            node.outputs = [f"{stem}{t}" for t in range(count)]
        return out_ids


class FunctionalGraph:
    """The nodes of a functional/Sequential Keras model, nested models flattened.

    It holds no reference to the model (so a cache of graphs keyed by model can let go of
    it): `name` and `structure` are what `rebuild` needs of it.

    Attributes:
        name: the model's name.
        structure: (input, output) of the model, tensors in their dict/list structure.
        nodes: `Node`s in topological order (model inputs first, with no inputs).
        node_by_name: {node name: Node}.
        outputs: the model's output tensor ids (in `model.outputs` order).
        shapes: {tensor id: shape}.

    Raises:
        InputError: the model is subclassed, or an unbuilt Sequential model.
    """

    def __init__(self, model):
        col = _Collector()
        outputs = col.collect(model)
        self.name = model.name
        self.structure = (_structure(model, "input"), _structure(model, "output"))
        for node in col.nodes:
            node.inputs = [col.resolve(t) for t in node.inputs]
            node.args = _resolve_refs(node.args, col.resolve)
            node.kwargs = _resolve_refs(node.kwargs, col.resolve)
        self.outputs = [col.resolve(t) for t in outputs]
        self.input_ids = col.input_ids
        self.shapes = {col.resolve(k): v for k, v in col.shapes.items()}
        self.nodes = _topological(col.nodes)
        self.node_by_name = {n.name: n for n in self.nodes}

    def consumers(self):
        """{tensor id: [a node for each time a node reads it]} (x * x reads x twice)."""
        found = {}
        for node in self.nodes:
            for tid in node.inputs:
                found.setdefault(tid, []).append(node)
        return found


def _resolve_refs(obj, resolve):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return {"__tensor__": resolve(obj["__tensor__"])}
        return {k: _resolve_refs(v, resolve) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_refs(v, resolve) for v in obj]
    return obj


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


# ----------------------------------------------------------------------------- rebuild


def layer_matcher(layers):
    """A predicate over layers from names, regexes, layer types or a callable: what `prune`,
    `factorize` and the other transforms take as `layers=`."""
    if layers is None:
        return lambda layer: True
    if callable(layers) and not isinstance(layers, type):
        return layers
    items = layers if isinstance(layers, (list, tuple, set)) else [layers]
    types = tuple(i for i in items if isinstance(i, type))
    patterns = [re.compile(i) for i in items if isinstance(i, str)]
    if len(types) + len(patterns) != len(items):
        raise InputError("layers must be names, regexes, layer classes or a callable. "
                         f"Received: layers={layers!r}")
    # Through the project's wrappers: a QAT wrapper is "quant_<name>", its layer keeps <name>.
    return lambda layer: any(isinstance(part, types) or any(p.fullmatch(part.name)
                                                            for p in patterns)
                             for part in wrapping.layers_of(layer))


def clone_layer(layer, config=None):
    """A fresh, unbuilt copy of `layer` from its (possibly edited) config."""
    if config is None:  # through serialization, so wrappers carry their inner layers
        return keras.layers.deserialize(keras.layers.serialize(layer))
    return type(layer).from_config(config)


def unique_names(graph):
    """{node name: layer name to use}: nested-model layers keep their name unless it clashes."""
    names, used = {}, set()
    for node in graph.nodes:
        if id(node.layer) in names:
            names[node.name] = names[id(node.layer)]
            continue
        name = node.layer.name
        if name in used:
            name = node.name.split("#")[0].replace("/", "_")
        while name in used:
            name += "_"
        used.add(name)
        names[node.name] = names[id(node.layer)] = name
    return names


def rebuild(graph, make_layer, then=None, name=None):
    """A new functional model: `make_layer(node) -> (layer, init)` for every node, in order.

    Shared layers (one layer, several nodes) get one new layer; Keras ops written as
    expressions (`x * 0.5`: stateless, no layers) are called as they are (dropped with the
    node whose output they take). `init(layer)` (or
    None) runs after the new layer is built by its first call, to set its weights.
    `make_layer` may also return None (the node is dropped: nothing may use its outputs) or
    `(layer, init, tid)`
    (the layer is called on tensor `tid` alone instead of the node's arguments; with layer
    None, the node's output is tensor `tid` itself). `then(node, tensor) -> tensor`, if
    given, post-processes every node's first output, model inputs included (QAT puts its
    range quantizers there). Inputs and outputs keep the model's structure (dicts too).
    """
    tensors, made = {}, {}
    inputs = []
    for node in graph.nodes:
        if not node.inputs:
            shape = graph.shapes[node.outputs[0]]
            tensor = keras.Input(batch_shape=shape, name=node.layer.name,
                                 dtype=node.layer.output.dtype)
            inputs.append(tensor)
            tensors[node.outputs[0]] = then(node, tensor) if then else tensor
            continue
        key = id(node.layer)
        first = key not in made
        if first:
            made[key] = (make_layer(node) if isinstance(node.layer, keras.layers.Layer)
                         else (node.layer, None))
        if made[key] is None:
            continue
        if not isinstance(node.layer, keras.layers.Layer) and any(
                t not in tensors for t in node.inputs):
            continue  # an op on a dropped node's output (a removed branch's `x + 3`): dropped
        layer, init, *only = made[key]
        if only:
            out = tensors[only[0]] if layer is None else layer(tensors[only[0]])
        else:
            out = layer(*substitute(node.args, tensors), **substitute(node.kwargs, tensors))
        if first and init is not None:
            init(layer)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if then:
            outs[0] = then(node, outs[0])
        for tid, tensor in zip(node.outputs, outs):
            tensors[tid] = tensor
    outputs = [tensors[t] for t in graph.outputs]
    return keras.Model(_packed(graph.structure[0], inputs), _packed(graph.structure[1], outputs),
                       name=name or graph.name)


def _structure(model, which):
    try:
        return getattr(model, which)
    except AttributeError:  # a Sequential model nested inside has none of its own
        return None


def _packed(structure, flat):
    """`flat` in the structure of the model's input/output (a tensor, a list or a dict)."""
    if isinstance(structure, dict) and len(structure) == len(flat):
        return keras.tree.pack_sequence_as(structure, flat)
    if len(flat) == 1 and not isinstance(structure, (list, tuple)):
        return flat[0]
    return flat
