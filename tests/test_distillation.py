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
