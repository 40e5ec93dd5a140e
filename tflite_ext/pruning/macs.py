"""Multiply-accumulate counts of a Keras model (Conv, depthwise, separable, Dense layers).

Example:
    >>> count_macs(models.digits_cnn())
    7150080
"""
import math

import keras

from tflite_ext.graph import unwrap


def _layer_macs(layer, in_shape, out_shape):
    layer = unwrap(layer)
    out_positions = math.prod(d for d in out_shape[1:-1] if d)
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        k = math.prod(layer.kernel.shape[:-2])
        return out_positions * out_shape[-1] * k
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        k = math.prod(layer.depthwise_kernel.shape[:-2])
        mid = layer.depthwise_kernel.shape[-2] * layer.depthwise_kernel.shape[-1]
        return out_positions * (mid * k + mid * out_shape[-1])
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        return out_positions * math.prod(layer.kernel.shape)
    if isinstance(layer, keras.layers.Dense):
        return out_positions * math.prod(layer.kernel.shape)
    return 0


def count_macs(model):
    """Total MACs of one inference (batch 1) over Conv*/Dense layers of a functional model."""
    from tflite_ext.graph import DependencyGraph

    graph = DependencyGraph(model)
    total = 0
    for node in graph.nodes:
        if node.inputs:
            total += _layer_macs(node.layer, graph.shapes.get(node.inputs[0], ()),
                                 graph.shapes.get(node.outputs[0]) or _out_shape(node))
    return total


def _out_shape(node):
    return tuple(node.layer.compute_output_shape(node.layer.input.shape))
