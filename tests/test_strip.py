"""strip(): the stripped model equals the masked model (max abs diff <= 1e-5, float32)."""
import platform
import warnings

import keras
import numpy as np
import pytest

from tests import pruning_models as pm
from tflite_ext import models
from tflite_ext.errors import InputError, UnsupportedLayerError
from tflite_ext.pruning import PruningCallback, count_macs, prune, strip


def _widths(model):
    return {layer.name: layer.kernel.shape[-1] for layer in model.layers
            if hasattr(layer, "kernel") and not hasattr(layer, "pointwise_kernel")}


def test_sequential_cnn():
    model = pm.sequential_cnn()
    _, small = pm.assert_strip_matches(model, 0.5)
    assert _widths(small) == {"c1": 4, "c2": 8, "fc": 8, "out": 5}


def test_resnet_identity_and_projection_shortcuts():
    model = pm.resnet()
    pruned, small = pm.assert_strip_matches(model, 0.5)
    widths = _widths(small)
    # The identity add ties stem and s1b; projection adds tie s2b/s2_shortcut, s3b/s3_shortcut.
    assert widths["stem_conv"] == widths["s1b_conv"] == 8
    assert widths["s2b_conv"] == widths["s2_shortcut"] == 16
    assert widths["s3b_conv"] == widths["s3_shortcut"] == 32
    assert widths["logits"] == 5
    assert count_macs(small) < count_macs(model) / 3


def test_mobilenet_v2_style_inverted_residuals():
    model = pm.mobilenet_v2_style()
    _, small = pm.assert_strip_matches(model, 0.5)
    assert small.get_layer("b1_dw").kernel.shape[-2] == 16  # 32 expanded channels halved
    assert small.get_layer("b2_project").kernel.shape[-1] == 6  # tied to b1 by the add


def test_inception_and_densenet_concatenate_offsets():
    model = pm.inception_dense_style()
    _, small = pm.assert_strip_matches(model, 0.5)
    # mixed = 6 + 8 + 4 -> 3 + 4 + 2; each dense step adds 6 -> 3 channels.
    assert small.get_layer("mixed").output.shape[-1] == 9
    assert small.get_layer("d1_cat").output.shape[-1] == 15
    assert small.get_layer("d1_bn").gamma.shape[-1] == 12


def test_xception_separable_block_with_residual():
    model = pm.xception_style()
    _, small = pm.assert_strip_matches(model, 0.5)
    assert small.get_layer("sep2").pointwise_kernel.shape == (1, 1, 16, 8)
    assert small.get_layer("shortcut").kernel.shape[-1] == 8


def test_conv1d_model():
    _, small = pm.assert_strip_matches(pm.conv1d_model(), 0.5)
    assert small.get_layer("dw").kernel.shape[-2] == 4


def test_flatten_into_dense_expands_channel_indices():
    _, small = pm.assert_strip_matches(pm.flatten_mlp(), 0.5)
    assert small.get_layer("fc1").kernel.shape == (4 * 4 * 4, 16)
    assert small.get_layer("fc2").kernel.shape == (16, 8)


def test_nested_models_are_flattened():
    _, small = pm.assert_strip_matches(pm.nested_model(), 0.5)
    assert not any(isinstance(layer, keras.Model) for layer in small.layers)
    assert small.get_layer("logits").kernel.shape == (8 * 8 * 3, 3)


def test_global_scope_and_round_to():
    model = pm.resnet()
    _, small = pm.assert_strip_matches(model, 0.4, scope="global", round_to=8)
    assert all(w % 8 == 0 or name == "logits" for name, w in _widths(small).items())


def test_keras_mobilenet_v2_application():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=4)
    _, small = pm.assert_strip_matches(model, 0.3, round_to=4)
    assert count_macs(small) < count_macs(model)


def test_unstructured_strip_bakes_zeros():
    model = pm.sequential_cnn()
    pruned = pm.masked(model, 0.6, granularity="unstructured")
    small = strip(pruned)
    kernel = small.get_layer("c2").kernel.numpy()
    assert kernel.shape == (3, 3, 8, 16)
    assert (kernel == 0).sum() == int(np.floor(0.6 * kernel.size))
    x = np.random.default_rng(0).uniform(size=(4, 10, 10, 3)).astype("float32")
    np.testing.assert_allclose(small(x), pruned(x), atol=1e-5, rtol=0)


def test_two_four_sparsity_pattern():
    pruned = pm.masked(pm.flatten_mlp(), 0.0, granularity="2:4")
    kernel = strip(pruned).get_layer("fc1").kernel.numpy()  # (128, 32): runs of 4 along inputs
    runs = kernel.reshape(32, 4, 32)
    assert ((runs != 0).sum(axis=1) <= 2).all()
    assert (kernel == 0).mean() == 0.5


def test_strip_of_never_pruned_model_is_an_error():
    with pytest.raises(InputError, match=r"^strip\(\) needs a model returned by prune\(\); .* "
                                         r"Received: model=seq_cnn$"):
        strip(pm.sequential_cnn())


def _regularized_cnn():
    l2 = keras.regularizers.L2(1e-2)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", kernel_regularizer=l2, name="c1")(inputs)
    x = keras.layers.ReLU(name="r1")(keras.layers.BatchNormalization(name="b1")(x))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", kernel_regularizer=l2,
                            name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(10, kernel_regularizer=l2, name="logits")(x))


def _assert_losses_follow_kernels(model):
    # One loss per regularized kernel, each computed from the kernel the model holds now.
    kernels = [model.get_layer(n).kernel for n in ("c1", "c2", "logits")]
    assert len(model.losses) == 3
    for loss, kernel in zip(model.losses, kernels):
        want = 1e-2 * np.square(keras.ops.convert_to_numpy(kernel)).sum()
        assert np.isclose(float(loss), want, rtol=1e-5)


def test_stripped_model_with_regularizers_trains_again_in_process(digits):
    # Regression: prune -> fit -> strip -> fit in one process. The stripped layers get their
    # own regularizers on their own (sliced) kernels, nothing shared with the pruned model.
    pruned = prune(_regularized_cnn(), 0.5, layers=["c1", "c2"])
    x, y = digits.x_train[:200], digits.y_train[:200]
    models.compile_classifier(pruned, 1e-3).fit(x, y, epochs=1, batch_size=32, verbose=0,
                                                callbacks=[PruningCallback()])
    small = strip(pruned)
    assert _widths(small) == {"c1": 4, "c2": 4, "logits": 10}
    _assert_losses_follow_kernels(small)
    before = [v.numpy().copy() for v in pruned.weights]
    loss = models.compile_classifier(small, 1e-3).fit(x, y, epochs=1, batch_size=32,
                                                      verbose=0).history["loss"][0]
    assert np.isfinite(loss)
    _assert_losses_follow_kernels(small)  # still the trained, stripped kernels
    assert all((v.numpy() == b).all() for v, b in zip(pruned.weights, before))


def _strided_shortcut_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inputs)
    y = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="branch")(x)
    s = keras.layers.Conv2D(16, 1, strides=2, name="shortcut")(x)
    return keras.Model(inputs, keras.layers.Add(name="add")([s, y]))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="oneDNN#6035 is an x86-64 kernel bug")
def test_strip_warns_about_onednn_strided_1x1_crash(monkeypatch):
    # Only build and strip here: fitting the result with oneDNN on would crash pytest.
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    pruned = pm.masked(_strided_shortcut_model(), 0.5, layers="stem")
    with pytest.warns(RuntimeWarning, match=r"\(shortcut\): .*\(uxlfoundation/oneDNN#6035\)"):
        small = strip(pruned)
    assert small.get_layer("shortcut").kernel.shape == (1, 1, 8, 16)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strip(pruned)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="oneDNN#6035 is an x86-64 kernel bug")
def test_prune_and_quantize_warn_where_the_user_meets_the_onednn_crash(monkeypatch):
    # A published model can have the layer before any pruning: plain fit would abort on it.
    from tflite_ext.quantization import quantize_model

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    i = keras.Input((8, 8, 3))
    thin = keras.Model(i, keras.layers.Conv2D(8, 1, strides=2, name="thin")(
        keras.layers.Conv2D(8, 3, name="stem")(i)))
    with pytest.warns(RuntimeWarning, match=r"^prune\(\) returns .*\(thin\): .*"
                                            r"TF_ENABLE_ONEDNN_OPTS=0"):
        prune(thin, 0.5)
    with pytest.warns(RuntimeWarning, match=r"^quantize_model\(\) returns .*\(thin\)"):
        quantize_model(thin)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune(thin, 0.5)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


# ---------------------------------------------------------------- whole residual branches


def _conv_names(model):
    return sorted(layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D))


def test_group_pruned_to_zero_removes_its_residual_branch(tmp_path):
    """s1a (identity shortcut) and s2a (projection shortcut) at 1.0: both branches and their
    Adds go (the callback silenced them: they added exactly zero), outputs unchanged."""
    model = pm.resnet()
    pruned, small = pm.assert_strip_matches(model, 0.5, round_to=8,
                                            group_sparsity={"s1a_.*": 1.0, "s2a_.*": 1.0})
    assert _conv_names(small) == sorted(
        ["stem_conv", "s2_shortcut", "s3a_conv", "s3b_conv", "s3_shortcut"])
    names = [layer.name for layer in small.layers]
    assert "s1_add" not in names and "s2_add" not in names and "s3_add" in names
    # s1_out repeated the stem's ReLU and went with the block; s2_out follows a conv.
    assert "s1_out" not in names and "s2_out" in names
    assert not any(isinstance(layer, keras.layers.Rescaling) for layer in small.layers)
    # Silenced: the removed branch's last conv bias and BN offset are zero.
    for name in ("s1b_conv", "s2b_conv"):
        np.testing.assert_array_equal(pruned.get_layer(name).layer.bias.numpy(), 0.0)
    np.testing.assert_array_equal(pruned.get_layer("s1b_bn").beta.numpy(), 0.0)
    # MACs: channel pruning alone at 0.5 keeps about a quarter; the branches take more.
    channels_only = strip(pm.masked(pm.resnet(), 0.5, round_to=8))
    removed = sum(count_macs(keras.Model(layer.input, layer.output))
                  for layer in channels_only.layers if layer.name in ("s1a_conv", "s1b_conv",
                                                                      "s2a_conv", "s2b_conv"))
    assert count_macs(small) == count_macs(channels_only) - removed
    path = tmp_path / "small.keras"
    small.save(path)
    x = np.random.default_rng(1).uniform(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(keras.models.load_model(path).predict(x, verbose=0),
                               small.predict(x, verbose=0), atol=1e-6)


def _sigmoid_branch():
    """A residual branch ending in a sigmoid: removed, it still adds sigmoid(0) = 0.5."""
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    y = keras.layers.Conv2D(8, 3, padding="same", name="a")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="sigmoid", name="b")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


def test_removed_branch_that_cannot_be_silenced_becomes_a_constant_add():
    model = _sigmoid_branch()
    bias = np.linspace(-1, 1, 8).astype("float32")
    model.get_layer("b").bias.assign(bias)
    pruned, small = pm.assert_strip_matches(model, 0.5, group_sparsity={"a": 1.0})
    np.testing.assert_array_equal(pruned.get_layer("b").layer.bias.numpy(), bias)  # untouched
    join = small.get_layer("add")
    assert isinstance(join, keras.layers.Rescaling) and join.scale == 1.0
    keep = pruned.get_layer("stem").out_mask.numpy() > 0
    assert keep.sum() == 4  # the kept half of 8 channels
    np.testing.assert_allclose(join.offset, 1 / (1 + np.exp(-bias[keep])), rtol=1e-6)


def _two_bn_branch(output_is_add=False):
    """stem -> [a, bn_a, relu_a, b, bn_b, relu_b, c, bn_c] -> add: removing `a` leaves two
    BatchNormalizations on the constant branch."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.ReLU(name="stem_relu")(keras.layers.Conv2D(8, 3, padding="same",
                                                                 name="stem")(inputs))
    y = x
    for name in "abc":
        y = keras.layers.Conv2D(8, 3, padding="same", name=name)(y)
        y = keras.layers.BatchNormalization(name=f"bn_{name}")(y)
        if name != "c":
            y = keras.layers.ReLU(name=f"relu_{name}")(y)
    x = keras.layers.Add(name="add")([x, y])
    if output_is_add:
        return keras.Model(inputs, x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


def test_removed_branch_with_two_batch_norms_settles_in_one_pass():
    """bn_c's moving mean must be set from what bn_b gives *after* bn_b is settled."""
    pruned = pm.masked(pm.randomize_bn(_two_bn_branch()), 0.5, group_sparsity={"a": 1.0})
    x = np.random.default_rng(0).uniform(size=(4, 8, 8, 3)).astype("float32")
    branch = keras.Model(pruned.inputs, pruned.get_layer("bn_c").output)
    for training in (False, True):
        out = keras.ops.convert_to_numpy(branch(x, training=training))
        np.testing.assert_array_equal(out, np.zeros_like(out))


def test_identity_join_that_is_a_model_output_keeps_its_name():
    _, small = pm.assert_strip_matches(_two_bn_branch(output_is_add=True), 0.5,
                                       group_sparsity={"a": 1.0})
    assert small.layers[-1].name == "add" and _conv_names(small) == ["stem"]


def test_removed_group_feeding_two_merged_convs_is_silenced():
    """a feeds b1 and b2, whose Add (itself constant) joins the stem: all of it goes."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    y = keras.layers.Conv2D(8, 3, padding="same", name="a")(x)
    y = keras.layers.Add(name="merge")([keras.layers.Conv2D(8, 1, name="b1")(y),
                                        keras.layers.Conv2D(8, 3, padding="same", name="b2")(y)])
    x = keras.layers.Add(name="join")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(x))
    for name in ("b1", "b2"):
        model.get_layer(name).bias.assign(np.full(8, 0.5, "float32"))
    _, small = pm.assert_strip_matches(model, 0.5, group_sparsity={"a": 1.0})
    assert [layer.name for layer in small.layers
            if not isinstance(layer, keras.layers.InputLayer)] == ["stem", "gap", "out"]


def test_shared_add_cannot_join_a_removed_branch():
    inputs = keras.Input((8, 8, 3))
    add = keras.layers.Add(name="shared_add")
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = add([x, keras.layers.Conv2D(8, 3, padding="same", name="b1")(
        keras.layers.Conv2D(8, 3, padding="same", name="a1")(x))])
    x = add([x, keras.layers.Conv2D(8, 3, padding="same", name="b2")(x)])
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(x))
    with pytest.raises(InputError, match=r"^A group pruned to zero channels \(group_sparsity "
                                         r"1\.0\) must end its residual branch in an Add layer "
                                         r"used once; 'shared_add' is called 2 times\. Use a "
                                         r"sparsity < 1 for that group\.$"):
        prune(model, 0.5, group_sparsity={"a1": 1.0})


def test_shared_relu_after_a_removed_block_is_kept():
    """One ReLU layer used twice (after the join, then after a conv) is not dropped: strip
    makes one new layer per shared layer, and only its first use repeats the stem's ReLU."""
    inputs = keras.Input((8, 8, 3))
    relu = keras.layers.ReLU(name="shared_relu")
    x = keras.layers.ReLU(name="stem_relu")(keras.layers.Conv2D(8, 3, padding="same",
                                                                 name="stem")(inputs))
    y = keras.layers.Conv2D(8, 3, padding="same", name="a")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="b")(y)
    x = relu(keras.layers.Add(name="add")([x, y]))
    x = relu(keras.layers.Conv2D(8, 3, padding="same", name="c")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(x))
    _, small = pm.assert_strip_matches(model, 0.5, group_sparsity={"a": 1.0})
    assert "add" not in [layer.name for layer in small.layers]
    assert "shared_relu" in [layer.name for layer in small.layers]


def test_removed_branch_stays_silent_while_training():
    """The optimizer moves the silenced bias and BN offset after each batch; the callback
    zeroes them again, so the fitted model strips to the same outputs without the block."""
    from tflite_ext.pruning import ConstantSparsity, PruningCallback

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(64, 16, 16, 3)).astype("float32"), rng.integers(0, 5, 64)
    pruned = prune(pm.resnet(), ConstantSparsity(0.5, 0), round_to=8,
                   group_sparsity={"s1a_.*": 1.0})
    models.compile_classifier(pruned, 1e-2).fit(x, y, epochs=2, batch_size=16, verbose=0,
                                                callbacks=[PruningCallback()])
    # (The branch conv's bias gets no gradient: BN subtracts a constant input's batch mean.)
    np.testing.assert_array_equal(pruned.get_layer("s1b_bn").beta.numpy(), 0.0)
    small = strip(pruned)
    assert "s1_add" not in [layer.name for layer in small.layers]
    np.testing.assert_allclose(small.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               atol=1e-5, rtol=0)


def test_group_removal_ramps_then_goes_at_the_end():
    from tflite_ext.pruning import PolynomialDecay
    from tflite_ext.pruning.plan import PruningPlan

    pruned = prune(pm.resnet(), PolynomialDecay(0.0, 0.5, 0, 10), round_to=8,
                   group_sparsity={"s1a_.*": 1.0})
    plan = PruningPlan(pruned)
    plan.apply(0.25)  # half way: s1a at sparsity 0.5 keeps 8 of 16
    assert int(pruned.get_layer("s1a_conv").out_mask.numpy().sum()) == 8
    plan.apply(0.5)  # the end: no channel left, min_channels and round_to do not apply
    assert int(pruned.get_layer("s1a_conv").out_mask.numpy().sum()) == 0
    assert "s1b_conv" not in _conv_names(strip(pruned))


def _branch_into_padding():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    y = keras.layers.Conv2D(8, 3, padding="same", name="a")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="sigmoid", name="b")(y)
    y = keras.layers.ZeroPadding2D(1, name="pad")(y)
    y = keras.layers.Conv2D(8, 3, name="c")(y)  # sees the zero border: not a constant
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


def test_group_removal_bad_input():
    with pytest.raises(InputError, match=r"^A group pruned to zero channels \(group_sparsity "
                                         r"1\.0\) must feed only a residual branch .* reaches "
                                         r"layer 'mixed' \(Concatenate\); use a sparsity < 1 "
                                         r"for that group\.$"):
        prune(pm.inception_dense_style(), 0.5, group_sparsity={"br_1x1": 1.0})
    with pytest.raises(InputError, match=r"^A group pruned to zero channels \(group_sparsity "
                                         r"1\.0\) would leave a model output constant\. "
                                         r"Received: output 'logits:0:0'$"):
        prune(pm.resnet(), 0.5, group_sparsity={"s3b_.*": 1.0})  # the main path, not a branch
    # b's sigmoid(0) = 0.5 meets c's zero border
    pruned = pm.masked(_branch_into_padding(), 0.5, group_sparsity={"a": 1.0})
    with pytest.raises(InputError, match=r"^The removed branch into 'add' is not the same at "
                                         r"every position"):
        strip(pruned)


def test_removed_branch_adds_exactly_zero_in_training_and_inference():
    """After removal the branch's BN normalizes a constant: both modes must give zero."""
    model = pm.randomize_bn(pm.resnet())
    model.get_layer("s1b_conv").bias.assign(np.linspace(-1, 1, 16).astype("float32"))
    pruned = pm.masked(model, 0.5, round_to=8, group_sparsity={"s1a_.*": 1.0})
    bn = pruned.get_layer("s1b_bn")
    np.testing.assert_array_equal(bn.moving_variance.numpy(), np.zeros(16, "float32"))
    x = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype("float32")
    branch = keras.Model(pruned.inputs, bn.output)
    for training in (False, True):
        out = keras.ops.convert_to_numpy(branch(x, training=training))
        np.testing.assert_array_equal(out, np.zeros_like(out))


def test_recalibrate_batch_norm_gives_the_exact_data_statistics():
    from tflite_ext.pruning import recalibrate_batch_norm

    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(5, 1, name="c")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(x))
    data = np.random.default_rng(0).normal(2.0, 3.0, (96, 4, 4, 3)).astype("float32")
    assert recalibrate_batch_norm(model, data, batch_size=32) == 1
    feats = keras.ops.convert_to_numpy(model.get_layer("c")(data)).reshape(3, -1, 5)
    bn = model.get_layer("bn")
    # Three equal batches: the plain mean of the per-batch statistics, momentum restored.
    np.testing.assert_allclose(bn.moving_mean.numpy(), feats.mean(axis=1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), feats.var(axis=1).mean(0), rtol=1e-4)
    assert bn.momentum == 0.99
    # A last, smaller batch counts as one batch (batches of 32, 32 and 16).
    assert recalibrate_batch_norm(model, data[:80], batch_size=32) == 1
    batches = [keras.ops.convert_to_numpy(model.get_layer("c")(data[i:j])).reshape(-1, 5)
               for i, j in ((0, 32), (32, 64), (64, 80))]
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               np.mean([b.var(0) for b in batches], 0), rtol=1e-4)
    with pytest.raises(InputError, match=r"^recalibrate_batch_norm needs samples and "
                                         r"batch_size >= 1\. Received: len\(x\)=96, "
                                         r"batch_size=0$"):
        recalibrate_batch_norm(model, data, batch_size=0)


def test_a_recalibrator_reestimates_again_after_the_weights_change():
    from tflite_ext.pruning.recalibrate import recalibrator

    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(5, 1, name="c")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(x))
    data = np.random.default_rng(0).normal(2.0, 3.0, (64, 4, 4, 3)).astype("float32")
    again = recalibrator(model, data, batch_size=64)
    conv, bn = model.get_layer("c"), model.get_layer("bn")
    for scale in (1.0, 2.0):  # the traced pass sees the kernel as it is now, not as traced
        conv.kernel.assign(conv.kernel * scale)
        assert again() == 1
        feats = keras.ops.convert_to_numpy(conv(data)).reshape(-1, 5)
        np.testing.assert_allclose(bn.moving_mean.numpy(), feats.mean(0), rtol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), feats.var(0), rtol=1e-4)
    assert bn.momentum == 0.99


def test_removed_branch_model_takes_qat_and_converts_to_full_integer():
    from tflite_ext import convert, inspect
    from tflite_ext.bench import host
    from tflite_ext.quantization import quantize_model

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(64, 16, 16, 3)).astype("float32"), rng.integers(0, 5, 64)
    small = strip(pm.masked(pm.resnet(), 0.5, round_to=8, group_sparsity={"s1a_.*": 1.0}))
    qat = models.compile_classifier(quantize_model(small))
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    flatbuffer = convert.to_tflite(qat).flatbuffer
    summary = inspect.summary(flatbuffer)
    assert summary["full_integer"] and summary["op_counts"]["CONV_2D"] == 7
    assert "RELU" not in summary["op_counts"]  # no standalone ReLU left where the block was
    top1 = np.argmax(qat.predict(x, verbose=0), -1)
    assert np.mean(np.argmax(host.predict(flatbuffer, x), -1) == top1) >= 0.95


def test_dict_outputs_prune_strip_and_count():
    # Keras sorts dict outputs by key; the walk must follow (it recursed forever before).
    L = keras.layers
    i = keras.Input((8, 8, 3), name="x")
    g = L.GlobalAveragePooling2D()(L.Conv2D(8, 3, activation="relu", name="c")(i))
    model = keras.Model(i, {"b": L.Dense(2, name="b")(g), "a": L.Dense(3, name="a")(g)})
    assert count_macs(model) == 36 * 27 * 8 + 8 * 2 + 8 * 3
    pruned = pm.masked(model, 0.5)
    small = strip(pruned)
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype("float32")
    want, got = pruned(x), small(x)
    assert sorted(got) == ["a", "b"] and small.get_layer("c").filters == 4
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5)


def test_a_layer_called_twice_keeps_one_set_of_channels():
    # A siamese tower: one conv, two calls. Its channels at both calls are one group (strip
    # was 0.15 off when each call was pruned on its own).
    L = keras.layers
    keras.utils.set_random_seed(0)
    shared = L.Conv2D(8, 3, padding="same", activation="relu", name="shared")
    a, b = keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")
    ya = L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="ha")(shared(L.Conv2D(3, 1)(a))))
    yb = L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="hb")(shared(L.Conv2D(3, 1)(b))))
    model = keras.Model([a, b], L.Add()([ya, yb]))
    pruned, small = pm.assert_strip_matches(model)
    assert small.get_layer("shared").filters == 4


def _hard_swish_model():
    """Hard-swish written as expressions, as Keras' MobileNetV3 does: x * relu6(x + 3) / 6."""
    x = inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="c1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = x * keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)
    x = keras.layers.Conv2D(16, 3, padding="same", name="c2")(x)
    x = keras.ops.hard_silu(keras.ops.maximum(x, -2.0) - 0.5)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="out")(x))


def test_elementwise_keras_ops_pass_channels_through():
    # MobileNetV3's hard-swish: the ops between c1 and c2 act on each channel alone, so c1's
    # and c2's channels are pruned and stripped (the graph refused them as unknown ops)
    _, small = pm.assert_strip_matches(_hard_swish_model(), 0.5)
    assert _widths(small) == {"c1": 8, "c2": 8, "out": 5}


@pytest.mark.parametrize("expression, op", [
    (lambda x: x * np.linspace(0.5, 1.5, 16).astype("float32"), "multiply"),  # per channel
    (lambda x: keras.ops.cumsum(x, axis=-1), "cumsum"),                        # mixes channels
])
def test_keras_ops_that_are_not_per_channel_stay_refused(expression, op):
    x = inputs = keras.Input((8, 8, 3))
    x = expression(keras.layers.Conv2D(16, 3, name="c1")(x))
    model = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.Flatten()(x)))
    with pytest.raises(UnsupportedLayerError,
                       match=f"does not see into the Keras op '{op}(_[0-9]+)?'"):
        prune(model, 0.5)


def test_keras_mobilenet_v3_application():
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), alpha=0.75, weights=None, classes=4,
        include_preprocessing=False, classifier_activation=None)
    pruned, small = pm.assert_strip_matches(model, 0.3, round_to=4)
    x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype("float32")
    assert np.abs(keras.ops.convert_to_numpy(pruned(x))).max() > 1e-3  # the match means something
    assert count_macs(small) < 0.75 * count_macs(model)


def test_keras_mobilenet_v3_block_removed_with_its_hard_swish_ops():
    # The block's hard-swish expressions (x + 3, * 1/6) go with its removed channels
    from tflite_ext.compress.search import prunable_groups

    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), alpha=0.75, weights=None, classes=4,
        include_preprocessing=False, classifier_activation=None)
    pattern = dict(prunable_groups(model))["expanded_conv_2_expand"]
    _, small = pm.assert_strip_matches(model, 0.3, round_to=4,
                                       group_sparsity={pattern: 1.0, ".*": 0.3})
    names = {layer.name for layer in small.layers}
    assert "expanded_conv_2_expand" not in names and "expanded_conv_2_project" not in names
    assert "expanded_conv_1_expand" in names
