"""prune / PruneWrapper / schedules / PruningCallback / importance, the Keras way."""
import keras
import numpy as np
import pytest
from keras import layers

from tests import pruning_models as pm
from tflite_ext import models
from tflite_ext.errors import InputError, UnsupportedLayerError
from tflite_ext.pruning import (ConstantSparsity, PolynomialDecay, PruneWrapper, PruningCallback,
                                prune, pruning_wrappers, strip)
from tflite_ext.pruning.importance import select_channels
from tflite_ext.pruning.plan import PruningPlan


# ----------------------------------------------------------------------------- wrapper


@pytest.mark.parametrize("layer, shape, granularity", [
    (layers.Conv1D(6, 3), (10, 4), "channel"),
    (layers.Conv2D(6, 3), (8, 8, 4), "channel"),
    (layers.DepthwiseConv2D(3), (8, 8, 4), "channel"),
    (layers.SeparableConv2D(6, 3), (8, 8, 4), "channel"),
    (layers.Dense(6), (4,), "channel"),
    (layers.Conv2D(6, 3), (8, 8, 4), "unstructured"),
    (layers.Dense(8), (8,), "2:4"),
])
def test_wrapper_the_keras_way(tmp_path, layer, shape, granularity):
    wrapper = PruneWrapper(layer, granularity=granularity, schedule=ConstantSparsity(0.5))
    x = np.random.default_rng(0).uniform(size=(2,) + shape).astype("float32")
    y = wrapper(x)
    inner_out = layer(x)
    np.testing.assert_allclose(y, inner_out, atol=1e-6)  # all-ones masks: no change
    assert len(wrapper.trainable_weights) == len(layer.trainable_weights)
    extra = 4 if granularity != "channel" else 3  # in_mask, out_mask, step (+ weight_mask)
    assert len(wrapper.non_trainable_weights) == extra
    out_mask = np.ones(y.shape[-1], "float32")
    out_mask[0] = 0
    wrapper.out_mask.assign(out_mask)
    inputs = keras.Input(shape)
    model = keras.Model(inputs, wrapper(inputs))
    path = tmp_path / "w.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    reloaded = loaded.layers[-1]
    assert isinstance(reloaded, PruneWrapper) and reloaded.granularity == granularity
    assert reloaded.schedule.get_config() == ConstantSparsity(0.5).get_config()
    if granularity == "channel":
        assert float(np.abs(keras.ops.convert_to_numpy(loaded(x))[..., 0]).max()) == 0.0
    loaded.compile("sgd", "mse")
    loaded.fit(x, np.zeros_like(keras.ops.convert_to_numpy(model(x))), epochs=1, verbose=0)
    assert int(reloaded.pruning_step) == 1


def test_wrapper_rejects_other_layers():
    with pytest.raises(UnsupportedLayerError, match=r"Received: layer=bn \(BatchNormalization\)$"):
        PruneWrapper(layers.BatchNormalization(name="bn"))


# ----------------------------------------------------------------------------- schedules


def test_polynomial_decay_values():
    s = PolynomialDecay(0.0, 0.8, begin_step=10, end_step=110, power=3, frequency=25)
    assert s(0) == (False, 0.0)
    assert s(10) == (True, 0.0)
    assert s(35)[0] and s(35)[1] == pytest.approx(0.8 * (1 - 0.75 ** 3))
    assert s(36)[0] is False
    assert s(110) == (True, pytest.approx(0.8))  # end step always prunes
    assert s(111) == (False, pytest.approx(0.8))
    assert PolynomialDecay.from_config(s.get_config()).get_config() == s.get_config()


def test_constant_sparsity_values():
    s = ConstantSparsity(0.5, begin_step=5, end_step=-1, frequency=10)
    assert [s(i)[0] for i in (0, 5, 6, 15, 1005)] == [False, True, False, True, True]
    assert s(15)[1] == 0.5


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [1.3, -0.1, 1.0])
def test_sparsity_outside_unit_interval(bad):
    with pytest.raises(InputError, match=rf"^sparsity must be in \[0, 1\)\. "
                                         rf"Received: sparsity={bad}$"):
        prune(pm.sequential_cnn(), bad)
    with pytest.raises(InputError, match=r"^final_sparsity must be in \[0, 1\)"):
        PolynomialDecay(0.0, bad, 0, 10)


def test_filter_matching_nothing():
    with pytest.raises(InputError, match=r"^layers matched no Conv/Dense layer of the model\. "
                                         r"Received: layers='nope\.\*'$"):
        prune(pm.sequential_cnn(), 0.5, layers="nope.*")
    with pytest.raises(InputError, match=r"^None of the chosen layers has prunable output "
                                         r"channels .* Received: layers=\['out'\]$"):
        prune(pm.sequential_cnn(), 0.5, layers=["out"])


def test_subclassed_model_rejected_by_prune():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 4), "float32"))
    with pytest.raises(InputError, match=r"^The model must be a functional or Sequential"):
        prune(net, 0.5)


def test_other_bad_arguments():
    with pytest.raises(InputError, match=r"^importance must be one of .* "
                                         r"Received: importance='l3'$"):
        prune(pm.sequential_cnn(), 0.5, importance="l3")
    with pytest.raises(InputError, match=r"^scope must be 'local' or 'global'\. "
                                         r"Received: scope='world'$"):
        prune(pm.sequential_cnn(), 0.5, scope="world")
    with pytest.raises(InputError, match=r"^round_to must be an integer >= 1\. "
                                         r"Received: round_to=0$"):
        prune(pm.sequential_cnn(), 0.5, round_to=0)


# ----------------------------------------------------------------------------- prune + fit


def test_layer_filters_select_groups():
    model = models.resnet8(input_shape=(16, 16, 3))
    names = lambda m: sorted(w.name for w in pruning_wrappers(m))  # noqa: E731
    # Choosing s1a_conv prunes its group: s1a_conv out channels, s1b_conv in channels.
    assert names(prune(model, 0.5, layers="s1a_conv")) == ["s1a_conv", "s1b_conv"]
    assert names(prune(model, 0.5, layers=layers.Conv2D)) == sorted(
        layer.name for layer in model.layers if isinstance(layer, (layers.Conv2D, layers.Dense)))
    assert names(prune(model, 0.5, layers="zz|s3b_conv")) == [
        "logits", "s3_shortcut", "s3b_conv"]
    by_callable = names(prune(model, 0.5, layers=lambda layer: layer.name.startswith("s3")))
    assert "logits" in by_callable and "stem_conv" not in by_callable


def _fit(model, data, epochs=1, callbacks=(), n=256):
    models.compile_classifier(model, 1e-3)
    return model.fit(data.x_train[:n], data.y_train[:n], epochs=epochs, batch_size=32,
                     callbacks=list(callbacks), verbose=0, shuffle=False)


def _pruned_fraction(model, name):
    return float((np.asarray(model.get_layer(name).out_mask) == 0).mean())


def test_callback_ramps_sparsity(digits):
    keras.utils.set_random_seed(0)
    pruned = prune(pm.sequential_cnn_8x8(), PolynomialDecay(0.0, 0.75, 0, 12, power=1,
                                                            frequency=4))
    callback = PruningCallback()
    _fit(pruned, digits, epochs=2, callbacks=[callback])  # 16 steps
    assert callback.history == [(0, 0.0), (4, 0.25), (8, 0.5), (12, 0.75)]
    assert _pruned_fraction(pruned, "c1") == 0.75 and _pruned_fraction(pruned, "c2") == 0.75
    assert int(pruned.get_layer("c1").pruning_step) == 16
    small = strip(pruned)
    assert small.get_layer("c1").kernel.shape[-1] == 2 and small.get_layer("c2").filters == 4


def test_save_mid_pruning_and_resume(digits, tmp_path):
    keras.utils.set_random_seed(0)
    schedule = PolynomialDecay(0.0, 0.75, 0, 24, power=1, frequency=4)
    pruned = prune(pm.sequential_cnn_8x8(), schedule)
    _fit(pruned, digits, epochs=1, callbacks=[PruningCallback()])  # 8 steps: sparsity 0.25
    masks = {w.name: np.asarray(w.out_mask) for w in pruning_wrappers(pruned)}
    path = tmp_path / "mid.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    for w in pruning_wrappers(loaded):
        np.testing.assert_array_equal(np.asarray(w.out_mask), masks[w.name])
        assert int(w.pruning_step) == 8
        assert w.schedule.get_config() == schedule.get_config()
    callback = PruningCallback()
    _fit(loaded, digits, epochs=2, callbacks=[callback])
    assert callback.history[0] == (12, 0.375) and callback.history[-1] == (24, 0.75)
    for w in pruning_wrappers(loaded):  # channels pruned before the save stay pruned
        assert (np.asarray(w.out_mask)[masks[w.name] == 0] == 0).all()
    assert _pruned_fraction(loaded, "c2") == 0.75


@pytest.mark.parametrize("importance", ["l1", "bn_scale", "mean_activation", "apoz", "taylor"])
def test_every_importance_runs_in_fit(digits, importance):
    keras.utils.set_random_seed(0)
    pruned = prune(pm.sequential_cnn_8x8(), ConstantSparsity(0.5, frequency=4),
                   importance=importance)
    data = (digits.x_train[:64], digits.y_train[:64]) if importance == "taylor" else None
    _fit(pruned, digits, callbacks=[PruningCallback(data=data)], n=160)
    assert _pruned_fraction(pruned, "c1") == 0.5


def test_taylor_without_data_is_an_error(digits):
    pruned = prune(pm.sequential_cnn_8x8(), 0.5, importance="taylor")
    with pytest.raises(InputError, match=r"^Taylor importance needs a batch"):
        _fit(pruned, digits, callbacks=[PruningCallback()], n=32)


def test_l2_prunes_the_smallest_channels():
    model = pm.flatten_mlp()
    conv = model.get_layer("conv")
    kernel = np.ones(conv.kernel.shape, "float32") * np.arange(1, 9, dtype="float32")
    conv.set_weights([kernel, np.zeros(8, "float32")])
    fc1 = model.get_layer("fc1")
    fc1.set_weights([np.ones(fc1.kernel.shape, "float32"), np.zeros(32, "float32")])
    pruned = prune(model, 0.5, layers="conv")
    PruningPlan(pruned).apply(0.5)
    np.testing.assert_array_equal(pruned.get_layer("conv").out_mask, [0, 0, 0, 0, 1, 1, 1, 1])
    in_mask = np.asarray(pruned.get_layer("fc1").in_mask).reshape(16, 8)
    assert (in_mask == [0, 0, 0, 0, 1, 1, 1, 1]).all()


def test_apoz_prunes_dead_channels(digits):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="relu", name="c1"),
        layers.Conv2D(8, 3, activation="relu", name="c2"), layers.GlobalAveragePooling2D(),
        layers.Dense(10, name="out")])
    c1 = model.get_layer("c1")
    kernel, bias = c1.get_weights()
    bias[:4] = -100.0  # channels 0-3 never fire after ReLU
    c1.set_weights([kernel, bias])
    pruned = prune(model, ConstantSparsity(0.5, begin_step=4, frequency=100), importance="apoz",
                   layers="c1")
    _fit(pruned, digits, callbacks=[PruningCallback()], n=160)
    np.testing.assert_array_equal(pruned.get_layer("c1").out_mask, [0, 0, 0, 0, 1, 1, 1, 1])


def test_select_channels_local_global_rounding():
    scores = {1: np.arange(16.0), 2: np.array([5.0, 1.0, 1.0, 1.0])}
    sizes = {1: 16, 2: 4}
    keep = select_channels(scores, sizes, 0.5)
    assert keep[1].sum() == 8 and keep[1][8:].all() and keep[2].tolist() == [1, 1, 0, 0]
    keep = select_channels(scores, sizes, 0.6, round_to=8, min_channels=3)
    assert keep[1].sum() == 8 and keep[2].sum() == 4  # 4 channels < round_to: untouched
    keep = select_channels(scores, sizes, 0.5, scope="global")
    assert keep[1].sum() + keep[2].sum() == 10
    scores[1][:4] = -np.inf  # already pruned channels go first
    assert select_channels(scores, sizes, 0.25)[1][:4].sum() == 0


def test_stripped_tflite_is_smaller(digits):
    from tflite_ext import convert

    keras.utils.set_random_seed(0)
    model = models.digits_cnn()
    pruned = pm.masked(model, 0.75, round_to=8)
    small = strip(pruned)
    rep = digits.x_train[:32]
    full = convert.to_tflite(model, rep).flatbuffer
    stripped = convert.to_tflite(small, rep).flatbuffer
    assert len(stripped) < len(full) / 8


def test_sparsity_for_mac_ratio_is_the_smallest_on_its_grid():
    from tflite_ext.pruning import mac_ratio, sparsity_for_mac_ratio

    model = pm.resnet()
    sparsity, ratio = sparsity_for_mac_ratio(model, 3.0, round_to=4)
    assert ratio >= 3.0 and mac_ratio(model, sparsity - 0.025, round_to=4) < 3.0
    with pytest.raises(InputError, match=r"^ratio must be >= 1\. Received: ratio=0\.5$"):
        sparsity_for_mac_ratio(model, 0.5)


# ----------------------------------------------------------------------------- group sparsity

# ResNet-8 groups: stem/s1 (16), s1a (16), s2a (32), s2 (32), s3a (64), s3 (64).
GROUPS = {"stem": "stem_conv", "s1a": "s1a_conv", "s2a": "s2a_conv", "s2": "s2b_conv",
          "s3a": "s3a_conv", "s3": "s3b_conv"}


def _group_widths(model):
    """Kept output channels per group of a stripped (or masked) ResNet-8."""
    def width(name):
        layer = model.get_layer(name)
        if isinstance(layer, PruneWrapper):
            return int(np.asarray(layer.out_mask).sum())
        return layer.filters
    return {group: width(name) for group, name in GROUPS.items()}


def test_group_sparsity_widths_after_strip_and_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(64, 16, 16, 3)).astype("float32"), rng.integers(0, 5, 64)
    # s3a_ comes first, so s3a takes 0.3 although "s3.*" matches it too.
    overrides = {"s3a_.*": 0.3, "s3.*": 0.5, "s2a_.*": 0.8}
    schedule = PolynomialDecay(0.0, 0.6, 0, 4, power=1, frequency=2)
    pruned = prune(pm.resnet(), schedule, layers=lambda layer: layer.name != "logits",
                   round_to=8, group_sparsity=overrides)
    models.compile_classifier(pruned).fit(x, y, epochs=1, batch_size=32, verbose=0,
                                          callbacks=[PruningCallback()])  # steps 0, 2 pruned
    path = tmp_path / "mid.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    for w in pruning_wrappers(loaded):
        assert w.policy["group_sparsity"] == overrides
        assert list(w.policy["group_sparsity"]) == list(overrides)  # order decides
    assert _group_widths(loaded) == _group_widths(pruned)
    callback = PruningCallback()
    models.compile_classifier(loaded).fit(x, y, epochs=1, batch_size=32, verbose=0,
                                          callbacks=[callback])
    assert callback.history == [(4, 0.6)]
    # keep = n - floor(s * n), then the nearest multiple of 8 (at least 8):
    # stem 16-9=7 -> 8; s1a 7 -> 8; s2a 32-25=7 -> 8; s2 32-19=13 -> 16;
    # s3a 64-19=45 -> 48; s3 64-32=32.
    expected = {"stem": 8, "s1a": 8, "s2a": 8, "s2": 16, "s3a": 48, "s3": 32}
    assert _group_widths(strip(loaded)) == expected


def test_group_sparsity_ramps_in_proportion():
    pruned = prune(pm.resnet(), PolynomialDecay(0.0, 0.5, 0, 10),
                   layers=lambda layer: layer.name != "logits",
                   group_sparsity={"s2a_bn": 0.75, "s3b_.*": 0.25})  # carriers match too
    plan = PruningPlan(pruned)
    plan.apply(0.25)  # half way: every group at half its final sparsity
    assert _group_widths(pruned) == {"stem": 12, "s1a": 12, "s2a": 20, "s2": 24, "s3a": 48,
                                     "s3": 56}
    plan.apply(0.5)
    assert _group_widths(pruned) == {"stem": 8, "s1a": 8, "s2a": 8, "s2": 16, "s3a": 32,
                                     "s3": 48}


def test_group_sparsity_bad_input():
    model = pm.resnet()
    with pytest.raises(InputError, match=r"^group_sparsity\['s3\.\*'\] must be in \[0, 1\]\. "
                                         r"Received: group_sparsity\['s3\.\*'\]=1\.2$"):
        prune(model, 0.5, group_sparsity={"s3.*": 1.2})
    with pytest.raises(InputError, match=r"^group_sparsity\['s3'\] must be in \[0, 1\]\. "
                                         r"Received: group_sparsity\['s3'\]='half'$"):
        prune(model, 0.5, group_sparsity={"s3": "half"})
    with pytest.raises(InputError, match=r"^group_sparsity pattern matches no layer of a "
                                         r"pruned group\. Received: group_sparsity key "
                                         r"'s9_.\*'$"):
        prune(model, 0.5, group_sparsity={"s3.*": 0.5, "s9_.*": 0.5})
    with pytest.raises(InputError, match=r"^group_sparsity pattern .* key 'logits'$"):
        prune(model, 0.5, group_sparsity={"logits": 0.5})  # feeds the output: never pruned
    with pytest.raises(InputError, match=r"^group_sparsity keys must be layer-name regexes\. "
                                         r"Received: group_sparsity key 's3\['$"):
        prune(model, 0.5, group_sparsity={"s3[": 0.5})
    with pytest.raises(InputError, match=r"^group_sparsity must be a non-empty dict .* "
                                         r"Received: group_sparsity=\[\('s3', 0\.5\)\]$"):
        prune(model, 0.5, group_sparsity=[("s3", 0.5)])
    with pytest.raises(InputError, match=r"^group_sparsity needs granularity='channel' and "
                                         r"scope='local'\. Received: granularity='channel', "
                                         r"scope='global'$"):
        prune(model, 0.5, scope="global", group_sparsity={"s3.*": 0.5})
    with pytest.raises(InputError, match=r"^group_sparsity ramps with the schedule, whose final "
                                         r"sparsity must be > 0\. Received: final sparsity=0\.0$"):
        prune(model, 0.0, group_sparsity={"s3.*": 0.5})


def test_unstructured_masks_hold_in_predict_after_fit(digits):
    import keras as _keras
    from tflite_ext import pruning as _pruning

    inputs = _keras.Input((8, 8, 1))
    x = _keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    model = _keras.Model(inputs, _keras.layers.Dense(10)(_keras.layers.Flatten()(x)))
    pruned = _pruning.prune(model, 0.5, granularity="unstructured")
    pruned.compile("adam", _keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(digits.x_train[:128], digits.y_train[:128], epochs=2, batch_size=32, verbose=0,
               callbacks=[_pruning.PruningCallback()])
    # predict between/after batches sees the sparse kernels: equal to the stripped model.
    np.testing.assert_allclose(pruned.predict(digits.x_test[:64], verbose=0),
                               _pruning.strip(pruned).predict(digits.x_test[:64], verbose=0),
                               atol=1e-5)


def test_bad_handler_rule_is_one_line_error():
    from tflite_ext import pruning

    class Scale(keras.layers.Layer):
        pass

    with pytest.raises(InputError, match="must be 'pass_through', 'barrier' or a Handler. "
                                         "Received: 'passthrough'"):
        pruning.register_handler(Scale, "passthrough")


def test_custom_importance_object_is_used_by_the_callback():
    from tflite_ext.pruning import Magnitude, prune
    from tflite_ext.pruning.plan import PruningPlan

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(16)(inputs)))
    custom = Magnitude(3)
    pruned = prune(model, 0.5, importance=custom)
    assert PruningPlan(pruned).importance is custom
