"""The channel dependency graph: groups, ties, index mapping, unknown layers."""
import keras
import numpy as np
import pytest
from keras import layers

from tests import pruning_models as pm
from tflite_ext import models
from tflite_ext.pruning import graph, handlers
from tflite_ext.errors import InputError, UnsupportedLayerError


def _summary(g):
    return [(grp.size, grp.producers, [c[0] for c in grp.consumers], [c[0] for c in grp.carriers])
            for grp in g.groups]


def test_resnet8_groups_tie_residual_branches():
    g = graph.DependencyGraph(models.resnet8())
    assert _summary(g) == [
        (16, ["stem_conv", "s1b_conv"], ["s1a_conv", "s2a_conv", "s2_shortcut"],
         ["stem_bn", "s1b_bn"]),
        (16, ["s1a_conv"], ["s1b_conv"], ["s1a_bn"]),
        (32, ["s2a_conv"], ["s2b_conv"], ["s2a_bn"]),
        (32, ["s2b_conv", "s2_shortcut"], ["s3a_conv", "s3_shortcut"], ["s2b_bn"]),
        (64, ["s3a_conv"], ["s3b_conv"], ["s3a_bn"]),
        # AveragePooling -> Flatten of a 1x1 map: one feature per channel into the logits.
        (64, ["s3b_conv", "s3_shortcut"], ["logits"], ["s3b_bn"]),
    ]


def test_model_output_channels_are_not_prunable():
    g = graph.DependencyGraph(models.digits_cnn())
    assert all("logits" not in grp.producers for grp in g.groups)
    assert [grp.producers for grp in g.groups] == [["conv1"], ["conv2"], ["conv3"], ["fc1"]]


def test_concatenate_maps_each_branch_at_its_offset():
    g = graph.DependencyGraph(pm.inception_dense_style())
    by_producer = {grp.producers[0]: grp for grp in g.groups}
    refs = {name: (fidx.tolist(), cidx.tolist()) for name, fidx, cidx in
            by_producer["br_3x3"].consumers}
    # mixed = [br_1x1 (6) | br_3x3 (8) | br_pool_proj (4)] -> br_3x3 sits at features 6..13
    assert refs["d0_conv"] == (list(range(6, 14)), list(range(8)))
    assert refs["transition"] == (list(range(6, 14)), list(range(8)))
    d1 = {name: fidx.tolist() for name, fidx, _ in by_producer["d1_conv"].consumers}
    assert d1 == {"transition": list(range(24, 30))}


def test_flatten_expands_channel_to_spatial_features():
    g = graph.DependencyGraph(pm.flatten_mlp())
    conv = next(grp for grp in g.groups if grp.producers == ["conv"])
    (name, fidx, cidx), = conv.consumers
    assert name == "fc1" and fidx.size == 4 * 4 * 8
    np.testing.assert_array_equal(cidx, np.tile(np.arange(8), 16))  # channels-last flatten


def test_depthwise_and_batchnorm_carry_channels():
    g = graph.DependencyGraph(pm.mobilenet_v2_style())
    b1 = next(grp for grp in g.groups if grp.producers == ["b1_expand"])
    assert [c[0] for c in b1.carriers] == ["b1_expand_bn", "b1_dw", "b1_dw_bn"]
    assert [c[0] for c in b1.consumers] == ["b1_project"]
    tied = next(grp for grp in g.groups if "b2_project" in grp.producers)
    assert tied.producers == ["b1_project", "b2_project"]


def test_sequential_and_nested_models_are_walked():
    g = graph.DependencyGraph(pm.sequential_cnn())
    assert [grp.producers for grp in g.groups] == [["c1"], ["c2"], ["fc"]]
    g = graph.DependencyGraph(pm.nested_model())
    assert [grp.producers for grp in g.groups] == [
        ["stem", "seq_block/inner_conv"], ["fn_block/proj"]]


def test_barrier_layers_block_both_sides():
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 3, name="c1")(inputs)
    x = layers.LayerNormalization(name="ln")(x)
    x = layers.Conv2D(8, 3, name="c2")(x)
    x = layers.Activation("softmax", name="sm")(x)
    x = layers.Conv2D(4, 1, name="c3")(x)
    g = graph.DependencyGraph(keras.Model(inputs, layers.Flatten()(x)))
    assert g.groups == []


class Scale(layers.Layer):
    """A per-channel scale the graph does not know."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def _custom_model():
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 3, name="c1")(inputs)
    x = Scale(name="scale")(x)
    x = layers.Conv2D(4, 3, name="c2")(x)
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x))


def test_unknown_layer_error_names_it_and_the_ways_out():
    with pytest.raises(UnsupportedLayerError, match=(
            r"^The channel graph does not know layer 'scale' \(Scale\): exclude it with "
            r"opaque=\['scale'\] or opt it in with tflite_ext\.pruning\.register_handler\(Scale, "
            r"tflite_ext\.pruning\.PASS_THROUGH\)\.$")):
        graph.DependencyGraph(_custom_model())


def test_unknown_layer_excluded_or_opted_in():
    assert graph.DependencyGraph(_custom_model(), opaque=["scale"]).groups == []
    handlers.register_handler(Scale, handlers.PASS_THROUGH)
    try:
        g = graph.DependencyGraph(_custom_model())
        assert [c[0] for c in g.groups[0].carriers] == ["scale"]
    finally:
        del handlers.HANDLERS[Scale]

    class RuleScale(Scale):
        tflite_ext_channel_rule = "pass_through"

    inputs = keras.Input((6, 6, 3))
    x = RuleScale(name="scale")(layers.Conv2D(8, 3, name="c1")(inputs))
    g = graph.DependencyGraph(keras.Model(inputs, layers.Conv2D(2, 1)(x)))
    assert g.groups[0].producers == ["c1"]


def test_subclassed_model_is_an_error():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 6, 6, 1), "float32"))
    with pytest.raises(InputError, match=r"^The model must be a functional or Sequential Keras "
                                         r"model; .* Received: model=Net$"):
        graph.DependencyGraph(net)


def test_mobilenet_v2_graph():
    g = graph.DependencyGraph(keras.applications.MobileNetV2(weights=None))
    assert len(g.nodes) == 156 and len(g.groups) == 25  # input + 155 layers
    assert g.groups[0].producers == ["Conv1"]


def test_handlers_look_through_nested_wrappers():
    from tflite_ext import wrapping
    from tflite_ext.pruning import PruneWrapper
    from tflite_ext.quantization import ActivationQuantizer, QuantizeWrapper

    conv = layers.Conv2D(4, 3)
    nested = QuantizeWrapper(PruneWrapper(conv))
    assert wrapping.unwrap(nested) is conv
    assert wrapping.find(nested, PruneWrapper) is nested.layer
    assert handlers.handler_for(nested).rule == "producer"
    # the quantization package's range layer declares its own rule (no registration)
    assert ActivationQuantizer not in handlers.HANDLERS
    assert handlers.handler_for(ActivationQuantizer()) is handlers.PASS_THROUGH
    assert handlers.handler_for(layers.LayerNormalization()) is handlers.BARRIER
    # Keras' own wrappers change what the inner layer computes: not looked through
    assert wrapping.unwrap(layers.TimeDistributed(conv)) is not conv


def test_savedmodel_layer_with_dict_outputs_is_a_one_line_error(tmp_path):
    # A TFSMLayer returns a dict: the walk follows it (a bare KeyError: 0 before), and the
    # layer, opaque to the graph, is named with the way out.
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3)(i)
    inner = keras.Model(i, {"a": layers.Conv2D(2, 1)(x), "b": layers.Conv2D(3, 1)(x)})
    inner.export(str(tmp_path / "sm"), verbose=False)
    j = keras.Input((8, 8, 3))
    y = layers.Conv2D(3, 3, padding="same", name="pre")(j)
    model = keras.Model(j, layers.TFSMLayer(str(tmp_path / "sm"), call_endpoint="serve",
                                            name="sm")(y))
    with pytest.raises(UnsupportedLayerError, match=r"^The channel graph does not know layer "
                                                    r"'sm' \(TFSMLayer\): exclude it with "
                                                    r"opaque=\['sm'\]"):
        graph.DependencyGraph(model)
    g = graph.DependencyGraph(model, opaque=["sm"])
    assert g.groups == [] and len(g.outputs) == 2
