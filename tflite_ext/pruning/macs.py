"""Multiply-accumulate counts of a Keras model (each layer's handler counts its own).

Example:
    >>> count_macs(models.digits_cnn())
    7150080
"""
from tflite_ext import wrapping
from tflite_ext.errors import UnsupportedLayerError
from tflite_ext.functional import FunctionalGraph
from tflite_ext.pruning.graph import graph_of
from tflite_ext.pruning.handlers import handler_for


def count_macs(model):
    """Total MACs of one inference (batch 1) of a functional or Sequential model.

    Conv, transposed conv, depthwise, separable and Dense layers count; the rest (and layers
    no handler knows) are free.
    """
    try:
        graph = graph_of(model)  # shared with prune and strip: built once per model
    except UnsupportedLayerError:  # a layer the channel graph refuses still has its MACs
        graph = FunctionalGraph(model)
    total = 0
    for node in graph.nodes:
        handler = handler_for(node.layer)
        if node.inputs and handler is not None:
            layer = wrapping.unwrap(node.layer)
            out_shape = graph.shapes.get(node.outputs[0]) or tuple(
                layer.compute_output_shape(layer.input.shape))
            total += handler.macs(layer, graph.shapes.get(node.inputs[0], ()), out_shape)
    return total
