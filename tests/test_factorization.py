"""Low-rank factorization: exact at full rank, the Eckart-Young error at rank R, the plan's
costs equal to what is built, DeepTwist, and the pairs through prune, QAT, convert and TFLM."""
import keras
import numpy as np
import pytest

from tflite_ext import convert, factorization, inspect, pruning
from tflite_ext.bench import host, micro
from tflite_ext.errors import InputError
from tflite_ext.factorization import svd
from tflite_ext.quantization import calibrate, quantize_model


def conv_model():
    """Every kind of candidate: strided/dilated spatial convs, a strided 1x1 conv, Dense on 3-D."""
    inputs = keras.Input((12, 11, 4), name="x")
    y = keras.layers.Conv2D(12, (3, 5), strides=(2, 2), padding="same", activation="relu",
                            name="c1")(inputs)
    y = keras.layers.Conv2D(10, (2, 3), dilation_rate=(1, 2), padding="valid", name="c2")(y)
    y = keras.layers.Conv2D(16, 1, strides=2, name="pw")(y)
    y = keras.layers.Dense(9, name="d3")(y)           # Dense on (batch, h, w, c)
    y = keras.layers.Flatten(name="flat")(y)
    outputs = keras.layers.Dense(7, name="out")(y)
    return keras.Model(inputs, outputs, name="conv_model")


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,), name="x")
    y = keras.layers.Dense(48, activation="relu", name="fc1")(inputs)
    y = keras.layers.Dense(40, activation="relu", name="fc2")(y)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(y), name="mlp")


@pytest.fixture(scope="module")
def x_conv():
    return np.random.default_rng(0).standard_normal((8, 12, 11, 4)).astype("float32")


def full_ranks(model):
    return {r.layer: r.max_rank for r in factorization.plan(model, energy=1.0).rows}


def test_full_rank_is_exact(x_conv):
    keras.utils.set_random_seed(0)
    model = conv_model()
    full = factorization.factorize(model, rank=full_ranks(model), skip_unprofitable=False,
                                   verbose=False)
    assert [layer.name for layer in full.layers] == [
        "x", "c1_svd", "c1", "c2_svd", "c2", "pw_svd", "pw", "d3_svd", "d3", "flat", "out_svd",
        "out"]
    assert full.get_layer("c1_svd").kernel.shape == (3, 1, 4, 12)   # min(3*4, 5*12)
    assert full.get_layer("c1").kernel.shape == (1, 5, 12, 12)
    assert full.get_layer("c1_svd").strides == (2, 1) and full.get_layer("c1").strides == (1, 2)
    assert full.get_layer("pw_svd").strides == (2, 2) and full.get_layer("pw").strides == (1, 1)
    assert np.abs(full(x_conv) - model(x_conv)).max() <= 1e-5


@pytest.mark.parametrize("name,rank", [("c1", 5), ("c2", 3), ("pw", 4), ("out", 3)])
def test_kernel_error_is_the_discarded_singular_values(name, rank):
    keras.utils.set_random_seed(1)
    model = conv_model()
    small = factorization.factorize(model, rank={name: rank}, verbose=False)
    row = next(r for r in factorization.plan(model, rank={name: rank}).rows if r.layer == name)
    s = svd.singular_values(keras.ops.convert_to_numpy(model.get_layer(name).kernel), row.scheme)
    expected = np.sqrt((s[rank:] ** 2).sum())
    assert factorization.kernel_error(model, small, name) == pytest.approx(expected, rel=1e-4)
    assert row.energy_kept == pytest.approx((s[:rank] ** 2).sum() / (s ** 2).sum(), rel=1e-9)


def test_plan_costs_equal_the_built_model():
    keras.utils.set_random_seed(2)
    model = conv_model()
    ranks = {"c1": 4, "c2": 2, "pw": 3, "out": 2}
    p = factorization.plan(model, rank=ranks)
    small = factorization.factorize(model, rank=ranks, verbose=False)
    assert p.ranks == ranks
    assert p.model_params == (model.count_params(), small.count_params())
    assert p.model_macs == (pruning.count_macs(model), pruning.count_macs(small))
    text = str(p)
    assert "c1" in text and "spatial" in text and f"{small.count_params():,}" in text


def test_unprofitable_layers_are_left_alone_and_reported():
    model = mlp()
    p = factorization.plan(model, rank=10)   # logits: 10 x (40 + 10) >= 400 weights
    rows = {r.layer: r for r in p.rows}
    assert rows["logits"].rank is None and "would not save" in rows["logits"].note
    assert rows["fc1"].rank == 10 and rows["fc2"].rank == 10
    small = factorization.factorize(model, rank=10, verbose=False)
    assert "logits_svd" not in [layer.name for layer in small.layers]


def test_energy_chooses_the_least_rank_rounded():
    model = mlp()
    p = factorization.plan(model, energy=0.8, round_to=4)
    for row in p.rows:
        if row.rank is None:
            continue
        s2 = svd.singular_values(keras.ops.convert_to_numpy(model.get_layer(row.layer).kernel),
                                 "channel") ** 2
        least = int(np.argmax(np.cumsum(s2) / s2.sum() >= 0.8 - 1e-12)) + 1
        assert row.rank == min(-(-least // 4) * 4, row.max_rank)
        assert row.energy_kept >= 0.8


@pytest.mark.parametrize("kind", ["param_budget", "mac_budget"])
def test_budget_is_met_and_spent(kind):
    model = mlp()
    total = model.count_params() if kind == "param_budget" else pruning.count_macs(model)
    budget = int(0.5 * total)
    p = factorization.plan(model, round_to=2, **{kind: budget})
    small = factorization.factorize(model, round_to=2, verbose=False, **{kind: budget})
    after = small.count_params() if kind == "param_budget" else pruning.count_macs(small)
    assert after <= budget
    # greedy fills the budget: one more rank step on any factorized layer would break it
    step = min(2 * sum(r.kernel_shape) for r in p.rows if r.rank)
    assert after > budget - step
    assert all(r.rank % 2 == 0 for r in p.rows if r.rank)
    same = factorization.plan(model, round_to=2, **{kind: 0.5})  # the fraction means the same
    assert same.ranks == p.ranks


def test_bad_input_is_one_line():
    model = mlp()
    cases = [
        (dict(rank=0), "rank=0"),
        (dict(rank={"fc1": 49}), "rank=49 is larger than layer 'fc1' allows (at most 48"),
        (dict(rank={"nope": 3}), "'nope'"),
        (dict(energy=0.0), "energy=0.0"),
        (dict(energy=1.5), "energy=1.5"),
        (dict(), "none"),
        (dict(rank=4, energy=0.9), "rank, energy"),
        (dict(param_budget=10), "param_budget=10 cannot be met by factorization"),
        (dict(mac_budget=1.5), "mac_budget=1.5"),
        (dict(rank=4, round_to=0), "round_to=0"),
        (dict(rank=4, layers=["fc9"]), "layers='fc9' matches no layer"),
    ]
    for kwargs, text in cases:
        with pytest.raises(InputError) as info:
            factorization.plan(model, **kwargs)
        message = str(info.value)
        assert text in message and "\n" not in message, (kwargs, message)
    with pytest.raises(InputError, match="least reachable"):
        factorization.factorize(model, param_budget=10, verbose=False)
    nothing = keras.Sequential([keras.Input((8,)), keras.layers.ReLU()])
    with pytest.raises(InputError, match="Nothing to factorize"):
        factorization.plan(nothing, rank=2)
    with pytest.raises(InputError, match="strip pruning"):
        factorization.plan(pruning.prune(model, 0.5), rank=2)
    with pytest.raises(InputError, match="every=0"):
        factorization.DeepTwist(rank=2, every=0)


def test_deeptwist_trains_to_exact_rank_then_factorizes_losslessly():
    model = mlp()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((96, 64)).astype("float32"), rng.integers(0, 10, 96)
    twist = factorization.DeepTwist(rank={"fc1": 6, "fc2": 5}, every=2)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[twist])
    assert twist.ranks == {"fc1": 6, "fc2": 5}
    for name, rank in twist.ranks.items():
        s = svd.singular_values(keras.ops.convert_to_numpy(model.get_layer(name).kernel),
                                "channel")
        assert s[rank:].max() <= 1e-5 * s[0]   # trained weights, and still exactly rank R
    small = factorization.factorize(model, rank=twist.ranks, verbose=False)
    assert np.abs(small(x) - model(x)).max() <= 1e-4
    assert twist.get_config() == {"rank": {"fc1": 6, "fc2": 5}, "energy": None,
                                  "param_budget": None, "mac_budget": None, "layers": None,
                                  "round_to": 1, "every": 2, "verbose": 0}


def _pruned(model, layers, x, y):
    """prune(0.5) -> one epoch with PruningCallback -> strip."""
    pruned = pruning.prune(model, 0.5, layers=layers)
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, y, epochs=1, verbose=0, callbacks=[pruning.PruningCallback()])
    return pruning.strip(pruned)


def test_strip_then_factorize_then_prune_the_ranks(digits):
    keras.utils.set_random_seed(3)
    model = mlp()
    x, y = digits.x_train[:64].reshape(64, -1), digits.y_train[:64]
    stripped = _pruned(model, ["fc1"], x, y)
    small = factorization.factorize(stripped, rank={"fc1": 8, "fc2": 8}, verbose=False)
    assert small.get_layer("fc1").kernel.shape == (8, 24)
    # the rank channels of fc2_svd are one dependency group like any other
    again = _pruned(small, ["fc2_svd"], x, y)
    assert again.get_layer("fc2_svd").units == 4 and again.get_layer("fc2").kernel.shape[0] == 4
    assert np.isfinite(again(x)).all()


def test_factorized_model_quantizes_converts_and_runs_on_tflm(digits, tmp_path):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8, 8, 1), name="image")
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    y = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv")(y)
    y = keras.layers.Conv2D(16, 1, name="pw")(y)
    y = keras.layers.Flatten(name="flat")(y)
    y = keras.layers.Dense(32, activation="relu", name="fc")(y)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(y))
    small = factorization.factorize(model, rank={"conv": 4, "pw": 4, "fc": 8}, verbose=False)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path)
    x = digits.x_test[:32]
    assert np.array_equal(loaded(x), small(x))
    qat = quantize_model(small)
    calibrate(qat, digits.x_train[:64])
    qat_result = convert.to_tflite(qat)
    assert qat_result.report["full_integer"]
    conv_kernels = [t for t in qat_result.report["tensors"]
                    if t["dtype"] == "int8" and len(t["shape"]) == 4 and t["const_bytes"]]
    scales = sorted(len(t["quantization"]["scale"]) for t in conv_kernels)
    assert len(conv_kernels) == 5 and scales[0] > 1   # every conv kernel per-channel
    result = convert.to_tflite(small, digits.x_train[:100])
    assert result.report["full_integer"] and not result.report["float_leaks"]
    ops = inspect.summary(result.flatbuffer)["op_counts"]
    assert ops["CONV_2D"] == 5 and ops["FULLY_CONNECTED"] == 3
    lite = host.load_interpreter(result.flatbuffer)
    assert lite is not None
    assert micro.agreement(result.flatbuffer, x)["top1_agreement"] == 1.0


def test_the_float_model_teaches_its_factorized_copy_through_hints(digits):
    """The second layer of a pair keeps the original name: hints and outputs still find it."""
    from tflite_ext import distillation

    keras.utils.set_random_seed(5)
    model = mlp()
    x, y = digits.x_train[:128].reshape(128, -1), digits.y_train[:128]
    small = factorization.factorize(model, rank={"fc1": 8, "fc2": 8}, verbose=False)
    student, history = distillation.fit(model, small, x, y, epochs=2, hints={"fc2": "fc2"},
                                        learning_rate=1e-3)
    assert student is small and np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    with pytest.raises(InputError, match="fc2_nope"):
        distillation.distill(model, small, hints={"fc2": "fc2_nope"})
