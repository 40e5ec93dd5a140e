"""Rebuilds a functional model node by node from a `DependencyGraph` with new layers.

`prune` uses it to clone a model with wrappers around chosen layers; `strip` uses it to build
a smaller model from sliced configs and weights. Models nested as layers come out flattened.
"""
import keras


def clone_layer(layer, config=None):
    """A fresh, unbuilt copy of `layer` from its (possibly edited) config."""
    return type(layer).from_config(config if config is not None else layer.get_config())


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


def substitute(obj, tensors):
    """`obj` (node args/kwargs) with every {"__tensor__": id} replaced by `tensors[id]`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: substitute(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, tensors) for v in obj]
    return obj


def rebuild(graph, make_layer, name=None):
    """Calls `make_layer(node) -> (layer, init)` for every node, in order.

    Shared layers (one layer, several nodes) get one new layer. `init(layer)` (or None) runs
    after the new layer is built by its first call, to set its weights. `make_layer` may also
    return None (the node is dropped: nothing may use its outputs) or `(layer, init, tid)`
    (the layer is called on tensor `tid` alone instead of the node's arguments; with layer
    None, the node's output is tensor `tid` itself). Returns the new functional model.
    """
    tensors, made = {}, {}
    inputs = []
    for node in graph.nodes:
        if not node.inputs:
            shape = graph.shapes[node.outputs[0]]
            tensor = keras.Input(batch_shape=shape, name=node.layer.name,
                                 dtype=node.layer.output.dtype)
            tensors[node.outputs[0]] = tensor
            inputs.append(tensor)
            continue
        key = id(node.layer)
        first = key not in made
        if first:
            made[key] = make_layer(node)
        if made[key] is None:
            continue
        layer, init, *only = made[key]
        if only:
            out = tensors[only[0]] if layer is None else layer(tensors[only[0]])
        else:
            out = layer(*substitute(node.args, tensors), **substitute(node.kwargs, tensors))
        if first and init is not None:
            init(layer)
        outs = out if isinstance(out, (list, tuple)) else [out]
        for tid, tensor in zip(node.outputs, outs):
            tensors[tid] = tensor
    outputs = [tensors[t] for t in graph.outputs]
    model = graph.model
    single_out = not isinstance(getattr(model, "output", None), (list, tuple)) and len(
        outputs) == 1
    single_in = len(inputs) == 1
    return keras.Model(inputs[0] if single_in else inputs, outputs[0] if single_out else outputs,
                       name=name or model.name)
