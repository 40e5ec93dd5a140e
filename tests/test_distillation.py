"""distill: the loss is the stated mix, pruning and QAT callbacks drive the
student, the distiller round-trips through .keras, bad inputs get one-line errors."""
import keras
import numpy as np
import pytest

from conftest import tiny_cnn
from tflite_ext import convert, distillation, inspect, pruning
from tflite_ext.errors import InputError
from tflite_ext.quantization import ActivationQuantizer, FreezeQuantization, quantize_model


@pytest.fixture
def teacher(trained_tiny):
    """A private copy of the trained tiny CNN (distill freezes its teacher)."""
    model = keras.models.clone_model(trained_tiny)
    model.set_weights(trained_tiny.get_weights())
    return model


def _copy(model):
    student = keras.models.clone_model(model)
    student.set_weights(model.get_weights())
    return student


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_loss_is_alpha_ce_plus_t2_kl(teacher, digits):
    keras.utils.set_random_seed(1)
    student = tiny_cnn()  # untrained: far from the teacher, so the KL term is large
    t, alpha = 3.0, 0.3
    distiller = distillation.distill(teacher, student, temperature=t, alpha=alpha)
    x, y = digits.x_train[:64], digits.y_train[:64]
    loss = float(distiller.compute_loss(x=x, y=y, y_pred=student(x), training=False))
    zs, zt = np.asarray(student(x)), np.asarray(teacher(x))
    ce = -np.mean(np.log(_softmax(zs)[np.arange(64), y]))
    p, q = _softmax(zt / t), _softmax(zs / t)
    kl = np.mean(np.sum(p * np.log(p / q), -1))
    assert kl > 0.005  # the KL term matters in the sum
    assert loss == pytest.approx(alpha * ce + (1 - alpha) * t * t * kl, rel=1e-4)


def test_fit_trains_student_only(teacher, digits):
    student = _copy(teacher)
    before_teacher, before_student = teacher.get_weights(), student.get_weights()
    distiller = distillation.distill(teacher, student, optimizer=keras.optimizers.Adam(1e-3))
    distiller.fit(digits.x_train[:256], digits.y_train[:256], epochs=1, batch_size=32, verbose=0)
    for a, b in zip(before_teacher, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(before_student, student.get_weights()))


def test_pruning_callback_on_the_distiller_then_strip(teacher, digits):
    student = pruning.prune(_copy(teacher), pruning.PolynomialDecay(0.0, 0.5, 0, 4, frequency=2))
    distiller = distillation.distill(teacher, student)
    callback = pruning.PruningCallback()
    distiller.fit(digits.x_train[:256], digits.y_train[:256], epochs=1, batch_size=32, verbose=0,
                  callbacks=[callback])
    assert callback.history[-1] == (4, 0.5)
    small = pruning.strip(distiller.student)
    conv = [layer for layer in small.layers if isinstance(layer, keras.layers.Conv2D)][0]
    assert conv.filters == 2  # 4 filters at 50% sparsity
    x = digits.x_test[:50]
    np.testing.assert_allclose(small(x), distiller.student(x), atol=1e-5)


def test_qat_student_freezes_and_converts_to_full_int8(teacher, digits):
    qat = quantize_model(_copy(teacher))
    distiller = distillation.distill(teacher, qat, optimizer=keras.optimizers.Adam(1e-4))
    distiller.fit(digits.x_train[:256], digits.y_train[:256], epochs=1, batch_size=32, verbose=0,
                  callbacks=[FreezeQuantization(0)])
    observing = [float(layer.observing) for layer in qat.layers
                 if isinstance(layer, ActivationQuantizer)]
    assert observing and all(v == 0.0 for v in observing)
    assert inspect.summary(convert.to_tflite(distiller.student).flatbuffer)["full_integer"]


def test_distiller_with_pruned_student_round_trips(teacher, digits, tmp_path):
    student = pruning.prune(_copy(teacher), 0.5)
    distiller = distillation.distill(teacher, student)
    distiller.fit(digits.x_train[:64], digits.y_train[:64], epochs=1, batch_size=32, verbose=0,
                  callbacks=[pruning.PruningCallback()])
    path = tmp_path / "distiller.keras"
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    x = digits.x_test[:20]
    np.testing.assert_allclose(loaded.student(x), distiller.student(x), atol=1e-6)
    np.testing.assert_allclose(loaded.teacher(x), teacher(x), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), r"temperature must be a number > 0\. Received: temperature=0\.0"),
    (dict(temperature="hot"), r"temperature must be a number > 0\. Received: temperature='hot'"),
    (dict(alpha=1.5), r"alpha must be a number in \[0, 1\]\. Received: alpha=1\.5"),
    (dict(temperature=float("nan")), r"temperature must be a number > 0\. Received: "
                                     r"temperature=nan"),
])
def test_bad_numbers(teacher, kwargs, message):
    with pytest.raises(InputError, match=message):
        distillation.distill(teacher, tiny_cnn(), **kwargs)


def test_bad_models(teacher):
    with pytest.raises(InputError, match=r"student must be a keras\.Model\. Received: "
                                         r"student=ndarray"):
        distillation.distill(teacher, np.zeros(3))
    inputs = keras.Input((8, 8, 1))
    five = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.Flatten()(inputs)))
    with pytest.raises(InputError, match=r"same shape\. Received: teacher output \(None, 10\), "
                                         r"student output \(None, 5\)"):
        distillation.distill(teacher, five)


def test_callbacks_given_a_distiller_work_on_its_student(teacher):
    student = pruning.prune(_copy(teacher), 0.5)
    distiller = distillation.distill(teacher, student)
    assert distillation.student_of(distiller) is student
    assert distillation.student_of(student) is student
    callback = pruning.PruningCallback()
    callback.set_model(distiller)
    callback.on_train_begin()
    assert callback._plan.model is student


def test_distill_leaves_the_callers_teacher_trainable():
    teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    distiller = distillation.distill(teacher, student)
    assert teacher.trainable and all(layer.trainable for layer in teacher.layers)
    assert not distiller.teacher.trainable
    np.testing.assert_array_equal(distiller.teacher.get_weights()[0], teacher.get_weights()[0])


# --- Hints, schedules and the one call (issue 13). -------------------------------------------

def named_cnn(width=8, name="cnn"):
    """Conv(width)-BN-ReLU, Conv(8)-BN-ReLU, GAP, Dense(10): every layer named."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name=name)


def dense_student(name="small"):
    """A different, smaller student with the same input and output (a factorized copy's role)."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Flatten(name="flat")(inputs)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name=name)


@pytest.fixture(scope="module")
def named_teacher(digits):
    keras.utils.set_random_seed(3)
    model = named_cnn(name="teacher")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits.x_train[:512], digits.y_train[:512], epochs=2, batch_size=64, verbose=0)
    return model


def _feature(model, name, x):
    return np.asarray(keras.Model(model.input, model.get_layer(name).output)(x, training=False))


def _kl(zt, zs, t):
    p, q = _softmax(zt / t), _softmax(zs / t)
    return np.mean(np.sum(p * np.log(p / q), -1))


def _ce(zs, y):
    return -np.mean(np.log(_softmax(zs)[np.arange(len(y)), y]))


def test_hint_on_a_pruned_layer_is_the_mse_of_its_kept_channels(named_teacher, digits):
    keras.utils.set_random_seed(4)
    student = pruning.prune(named_cnn(name="student"), 0.5, layers=["conv1"])
    x, y = digits.x_train[:64], digits.y_train[:64]
    distiller = distillation.distill(named_teacher, student, temperature=2.0, alpha=0.25,
                                     hints={"conv1": "conv1", "relu2": "relu2"}, hint_weight=0.5,
                                     optimizer=keras.optimizers.SGD(0.0))
    distiller.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[pruning.PruningCallback()])
    mask = np.asarray(student.get_layer("conv1").out_mask)
    assert mask.sum() == 4  # half of conv1's 8 channels masked
    loss = float(distiller.compute_loss(x=x, y=y, training=False))
    zs, zt = np.asarray(student(x)), np.asarray(named_teacher(x))
    t1, s1 = _feature(named_teacher, "conv1", x), _feature(student, "conv1", x)
    assert np.all(s1[..., mask == 0] == 0)
    hint1 = np.mean((t1 * mask - s1) ** 2)  # masked channels: zero on both sides
    hint2 = np.mean((_feature(named_teacher, "relu2", x) - _feature(student, "relu2", x)) ** 2)
    expected = 0.25 * _ce(zs, y) + 0.75 * (4.0 * _kl(zt, zs, 2.0) + 0.5 * (hint1 + hint2))
    assert hint1 > 0.01 and hint2 > 0.01
    assert loss == pytest.approx(expected, rel=1e-4)


def test_one_student_pass_per_step_with_hints(named_teacher, digits):
    # Keras' own Distiller runs the student twice per step when it has feature losses: the
    # pruning step would count 2 per batch, BN statistics and QAT ranges move twice.
    student = pruning.prune(named_cnn(name="student"), 0.5, layers=["conv1"])
    distiller = distillation.distill(named_teacher, student, hints={"relu1": "relu1"})
    distiller.fit(digits.x_train[:96], digits.y_train[:96], epochs=1, batch_size=32, verbose=0,
                  callbacks=[pruning.PruningCallback()])
    assert int(student.get_layer("conv1").pruning_step.numpy()) == 3


def test_hint_names_survive_strip_and_qat(named_teacher, digits):
    x, y = digits.x_train[:128], digits.y_train[:128]
    pruned = pruning.prune(named_cnn(name="student"), 0.5, layers=["conv1"])
    hints = {"conv2": "conv2", "relu1": "relu1"}
    pruned, _ = distillation.fit(named_teacher, pruned, x, y, epochs=1, hints=hints)
    small = pruning.strip(pruned)
    assert small.get_layer("conv1").filters == 4 and small.get_layer("conv2").filters == 8
    # Second stage after strip: the same name, the same layer; relu1 lost channels.
    distillation.distill(named_teacher, small, hints={"conv2": "conv2"})
    with pytest.raises(InputError, match=r"^hint 'relu1' -> 'relu1': teacher feature "
                                         r"\(None, 8, 8, 8\) and student feature "
                                         r"\(None, 8, 8, 4\) differ; .*distill before strip"):
        distillation.distill(named_teacher, small, hints=hints)
    # QAT: conv2's BN is folded into quant_conv2, whose output is bn2's.
    qat = quantize_model(small)
    distiller = distillation.distill(named_teacher, qat, hints={"bn2": "bn2", "relu2": "relu2"})
    assert [h.student_layer_name for h in distiller.distillation_losses[1:]] == \
        ["quant_conv2", "relu2"]
    distiller.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(InputError, match=r"^hint layer 'conv2' of the student has "
                                         r"BatchNormalization 'bn2' folded into it"):
        distillation.distill(named_teacher, qat, hints={"conv2": "conv2"})


@pytest.mark.parametrize("hints, message", [
    ({"nope": "relu1"}, r"^hint layer 'nope' is not a layer of the teacher 'teacher' \(layers: "
                        r"\['image', 'conv1', .*\]\)\. Received: teacher layer 'nope'$"),
    ({"relu1": "relu9"}, r"^hint layer 'relu9' is not a layer of the student 'student' .*"
                         r"Received: student layer 'relu9'$"),
    ({"relu1": "gap"}, r"^hint 'relu1' -> 'gap': teacher feature \(None, 8, 8, 8\) and student "
                       r"feature \(None, 8\) differ"),
    ("relu1", r"^hints must be \{teacher layer: student layer\}"),
    ([("relu1", 3)], r"^hint layer names must be non-empty strings\. Received: "
                     r"hint \('relu1', 3\)"),
])
def test_bad_hints(named_teacher, hints, message):
    with pytest.raises(InputError, match=message):
        distillation.distill(named_teacher, named_cnn(name="student"), hints=hints)


def test_bad_hint_weight_and_output_shape(named_teacher):
    with pytest.raises(InputError, match=r"^hint_weight must be a number >= 0\. Received: "
                                         r"hint_weight=-1$"):
        distillation.distill(named_teacher, named_cnn(), hints={"relu1": "relu1"}, hint_weight=-1)
    inputs = keras.Input((8, 8, 1), name="image")
    five = keras.Model(inputs, keras.layers.Dense(5, name="five")(
        keras.layers.Flatten(name="flat")(inputs)))
    with pytest.raises(InputError, match=r"^teacher and student must have one output of the "
                                         r"same shape\. Received: teacher output \(None, 10\), "
                                         r"student output \(None, 5\)$"):
        distillation.fit(named_teacher, five, np.zeros((4, 8, 8, 1)), np.zeros(4))


def test_schedule_changes_the_compiled_loss(named_teacher, digits):
    """Epoch e's logged loss is alpha_e * CE + (1 - alpha_e) * T_e^2 * KL at T_e: the
    variables reach the traced train function (weights frozen by a zero learning rate)."""
    keras.utils.set_random_seed(5)
    student = dense_student()
    x, y = digits.x_train[:100], digits.y_train[:100]
    distiller = distillation.distill(named_teacher, student, optimizer=keras.optimizers.SGD(0.0))
    schedule = distillation.DistillationSchedule(temperature=(1.0, 5.0),
                                                 alpha=lambda epoch: [0.9, 0.5, 0.1][epoch])
    history = distiller.fit(x, y, epochs=3, batch_size=100, verbose=0, callbacks=[schedule])
    assert schedule.history == [(0, 1.0, 0.9), (1, 3.0, 0.5), (2, 5.0, 0.1)]
    zs, zt = np.asarray(student(x)), np.asarray(named_teacher(x))
    expected = [a * _ce(zs, y) + (1 - a) * t * t * _kl(zt, zs, t)
                for t, a in [(1.0, 0.9), (3.0, 0.5), (5.0, 0.1)]]
    np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-4)
    assert len(set(np.round(expected, 3))) == 3  # three different losses
    assert distiller.student_loss_weight == pytest.approx(0.1)


def test_schedule_per_step_and_round_trip(named_teacher, digits, tmp_path):
    student = pruning.prune(named_cnn(name="student"), 0.5, layers=["conv1"])
    distiller = distillation.distill(named_teacher, student, hints={"conv1": "conv1"})
    schedule = distillation.DistillationSchedule(alpha=(0.0, 0.5), temperature=2.0, per="step")
    x, y = digits.x_train[:96], digits.y_train[:96]
    distiller.fit(x, y, epochs=2, batch_size=32, verbose=0,
                  callbacks=[schedule, pruning.PruningCallback()])
    assert [a for _, _, a in schedule.history] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5])
    config = keras.saving.serialize_keras_object(schedule)
    again = keras.saving.deserialize_keras_object(config)
    assert (again.alpha, again.temperature, again.per) == ((0.0, 0.5), 2.0, "step")
    distiller.save(tmp_path / "d.keras")  # the current alpha and T are what is saved
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    assert loaded.student_loss_weight == 0.5 and float(loaded.temperature) == 2.0
    assert loaded.distillation_losses[1].student_layer_name == "conv1"
    np.testing.assert_allclose(float(loaded.compute_loss(x=x, y=y, training=False)),
                               float(distiller.compute_loss(x=x, y=y, training=False)), rtol=1e-5)


def test_bad_schedules(named_teacher, digits):
    with pytest.raises(InputError, match=r"^temperature must be a number > 0\. Received: "
                                         r"temperature=0\.0$"):
        distillation.DistillationSchedule(temperature=(4.0, 0.0))
    with pytest.raises(InputError, match=r"^alpha must be a number, a \(start, end\) pair"):
        distillation.DistillationSchedule(alpha=(0.1, 0.2, 0.3))
    with pytest.raises(InputError, match=r"^per must be one of"):
        distillation.DistillationSchedule(alpha=0.5, per="batch")
    x, y = digits.x_train[:32], digits.y_train[:32]
    bad = distillation.DistillationSchedule(alpha=lambda epoch: 2.0)
    with pytest.raises(InputError, match=r"^alpha must be a number in \[0, 1\]\. Received: "
                                         r"alpha=2\.0 \(at epoch 0\)$"):
        distillation.distill(named_teacher, dense_student()).fit(x, y, verbose=0, callbacks=[bad])
    plain = models_compiled(dense_student())
    with pytest.raises(InputError, match=r"^DistillationSchedule needs a tflite_ext"):
        plain.fit(x, y, verbose=0, callbacks=[distillation.DistillationSchedule(alpha=0.5)])


def models_compiled(model):
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_one_call_for_pruned_qat_and_smaller_students(named_teacher, digits):
    x, y = digits.x_train[:128], digits.y_train[:128]  # 4 steps an epoch
    val = (digits.x_test[:64], digits.y_test[:64])
    schedule = pruning.PolynomialDecay(0.0, 0.5, 0, 8, frequency=4)
    # Pruned + QAT in one fit: PruningCallback is added, FreezeQuantization is the caller's.
    qat = quantize_model(pruning.prune(named_cnn(name="student"), schedule, layers=["conv1"]))
    qat, history = distillation.fit(named_teacher, qat, x, y, epochs=2, learning_rate=1e-3,
                                    hints={"relu2": "relu2"}, validation_data=val,
                                    callbacks=[FreezeQuantization(6)])
    assert set(history.history) >= {"loss", "accuracy", "val_accuracy"}
    assert int(np.asarray(qat.get_layer("quant_conv1").layer.out_mask).sum()) == 4
    small = pruning.strip(qat)
    assert inspect.summary(convert.to_tflite(small).flatbuffer)["full_integer"]
    # A pruned student whose caller brought a PruningCallback gets no second one.
    pruned = pruning.prune(named_cnn(name="student"), schedule, layers=["conv1"])
    assert distillation.needed_callbacks(pruned, [pruning.PruningCallback()]) == []
    assert [type(c).__name__ for c in distillation.needed_callbacks(pruned, [])] == \
        ["PruningCallback"]
    # Any student with the same input and output shapes: a smaller Dense model.
    small_dense = dense_student()
    before = small_dense.get_weights()[0].copy()
    trained, _ = distillation.fit(named_teacher, small_dense, x, y, epochs=1, alpha=0.3)
    assert trained is small_dense and not np.array_equal(before, trained.get_weights()[0])


def test_a_softmax_teacher_is_refused_in_one_line():
    """A Keras application's default head is a softmax: distilling from it would treat
    probabilities as logits, silently. (Built with weights=None, as users bring it.)"""
    teacher = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=10,
                                             alpha=0.35)
    student = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=10,
                                             alpha=0.35, classifier_activation=None)
    with pytest.raises(InputError) as info:
        distillation.distill(teacher, student)
    message = str(info.value)
    assert "'predictions' ends in softmax" in message and "classifier_activation=None" in message
    assert "\n" not in message


class _Traces(keras.layers.Layer):
    """Counts the traces of the step functions it runs in: its Python runs once per trace."""

    count = 0

    def call(self, x):
        _Traces.count += 1
        return x


def test_fit_traces_the_train_step_once(teacher, digits):
    """Keras builds the optimizer and a string "accuracy" metric inside the first trace, and
    TensorFlow then traced the step again (`tracing`): 4-5 s of every short ResNet-8 run."""
    from tflite_ext import models

    def counted():
        inputs = keras.Input(digits.x_train.shape[1:])
        x = keras.layers.Flatten()(_Traces()(inputs))
        return keras.Model(inputs, keras.layers.Dense(10)(x))

    x, y = digits.x_train[:100], digits.y_train[:100]  # a last batch of 4: no retrace either
    student = counted()
    before = _Traces.count
    _, history = distillation.fit(teacher, student, x, y, epochs=2, batch_size=32)
    assert _Traces.count - before == 1
    assert set(history.history) >= {"accuracy", "loss"}
    model = models.compile_classifier(counted())
    before = _Traces.count
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert _Traces.count - before == 1
    assert "accuracy" in history.history
