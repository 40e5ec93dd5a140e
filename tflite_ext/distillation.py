"""Knowledge distillation for compressed models: a thin layer over `keras.distillation`.

The float model teaches its pruned and/or quantization-aware copy in the same `fit`. `distill`
returns a compiled `keras.distillation.Distiller`; train it, then strip/convert
`distiller.student` as usual. Callbacks that work on the model itself (`PruningCallback`,
`FreezeQuantization`) go through `StudentCallback`, which hands them the student instead of
the distiller (the dependency graph is built over the student's functional graph).

Example:
    >>> from tflite_ext import distillation, pruning
    >>> student = pruning.prune(teacher, 0.75, round_to=8)
    >>> distiller = distillation.distill(teacher, student, temperature=4.0, alpha=0.5,
    ...                                  optimizer=keras.optimizers.Adam(5e-4))
    >>> distiller.fit(x, y, epochs=10,
    ...               callbacks=[distillation.StudentCallback(pruning.PruningCallback())])
    >>> small = pruning.strip(distiller.student)
"""
import keras

from tflite_ext.errors import InputError


def _check_model(name, model):
    if not isinstance(model, keras.Model):
        raise InputError(f"{name} must be a keras.Model. Received: {name}={type(model).__name__}")
    try:
        model.outputs
    except AttributeError:
        raise InputError(f"{name} must be built (a functional model, or call it once). "
                         f"Received: {name}={model.name!r}") from None


def distill(teacher, student, *, temperature=4.0, alpha=0.5, optimizer="adam", loss=None,
            metrics=("accuracy",)):
    """Returns a compiled `keras.distillation.Distiller` that trains `student` from `teacher`.

    The loss is `alpha * loss(y, student) + (1 - alpha) * T^2 * KL(softmax(teacher / T) ||
    softmax(student / T))`. Both models output logits. The teacher runs in inference mode,
    frozen; a functional or Sequential teacher is copied first, so the model you pass stays
    trainable (Keras' Distiller sets `trainable = False` on the teacher it is given, and a later
    `prune` or `quantize_model` of that model would carry the flag into its copies).

    Args:
        teacher: trained `keras.Model` (e.g. the float model).
        student: `keras.Model` with the same input and output shapes (e.g. a pruned or QAT copy).
        temperature: softmax temperature T > 0 for the soft targets.
        alpha: weight in [0, 1] of the ground-truth loss; 1 - alpha weighs the teacher's.
        optimizer: optimizer instance or name.
        loss: ground-truth loss; default sparse categorical cross-entropy on logits.
        metrics: metrics on the student's predictions.

    Example:
        >>> distiller = distill(float_model, quantize_model(small), temperature=4.0, alpha=0.5,
        ...                     optimizer=keras.optimizers.Adam(3e-5))
        >>> distiller.fit(x, y, epochs=5,
        ...               callbacks=[StudentCallback(FreezeQuantization(120))])
        >>> int8 = convert.to_tflite(distiller.student).flatbuffer
    """
    _check_model("teacher", teacher)
    _check_model("student", student)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature > 0:
        raise InputError(f"temperature must be a number > 0. Received: temperature={temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise InputError(f"alpha must be a number in [0, 1]. Received: alpha={alpha!r}")
    t_shape, s_shape = tuple(teacher.outputs[0].shape), tuple(student.outputs[0].shape)
    if len(teacher.outputs) != 1 or len(student.outputs) != 1 or t_shape != s_shape:
        raise InputError("teacher and student must have one output of the same shape. Received: "
                         f"teacher output {t_shape}, student output {s_shape}")
    try:
        frozen = keras.models.clone_model(teacher)
        frozen.set_weights(teacher.get_weights())
    except (TypeError, ValueError, NotImplementedError):
        frozen = teacher  # a subclassed model without a config: frozen in place
    distiller = keras.distillation.Distiller(
        teacher=frozen,
        student=student,
        # A KLDivergence *instance*: with the string "kl_divergence" Keras applies KL to the
        # scaled logits instead of to their softmax.
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=float(temperature), loss=keras.losses.KLDivergence()),
        student_loss_weight=float(alpha),
    )
    distiller.compile(
        optimizer=optimizer,
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=list(metrics) if metrics else None,
    )
    return distiller


@keras.saving.register_keras_serializable(package="tflite_ext")
class StudentCallback(keras.callbacks.Callback):
    """Runs `callback` on the distiller's student rather than on the distiller.

    `PruningCallback` builds a dependency graph of its model and `FreezeQuantization` looks
    for quantizers in it; both need the student's functional graph, not the `Distiller`.
    Wrap only callbacks that work on the layers: those that use the optimizer or the training
    loop (`LearningRateScheduler`, `EarlyStopping`) go to `fit` unwrapped.

    Args:
        callback: a `keras.callbacks.Callback`.

    Example:
        >>> distiller.fit(x, y, callbacks=[StudentCallback(PruningCallback())])
    """

    def __init__(self, callback):
        super().__init__()
        if not isinstance(callback, keras.callbacks.Callback):
            raise InputError("callback must be a keras.callbacks.Callback. "
                             f"Received: callback={type(callback).__name__}")
        self.callback = callback

    def set_model(self, model):
        super().set_model(model)
        student = getattr(model, "student", None)
        if not isinstance(student, keras.Model):
            raise InputError("StudentCallback needs a model with a `student` (a keras Distiller)."
                             f" Received: model={type(model).__name__}")
        self.callback.set_model(student)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def get_config(self):
        return {"callback": keras.saving.serialize_keras_object(self.callback)}

    @classmethod
    def from_config(cls, config):
        inner = config["callback"]
        inner_cls = keras.saving.get_registered_object(inner["registered_name"])
        if inner_cls is None:
            raise InputError("The wrapped callback class is not registered with keras.saving."
                             f" Received: callback={inner['registered_name']!r}")
        # keras.callbacks.Callback has no from_config: a callback's config is its arguments.
        make = getattr(inner_cls, "from_config", None) or (lambda c: inner_cls(**c))
        return cls(make(inner["config"]))


def _forward(hook):
    def method(self, *args, **kwargs):
        return getattr(self.callback, hook)(*args, **kwargs)

    method.__name__ = hook
    return method


for _hook in ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
              "on_train_batch_begin", "on_train_batch_end", "on_test_begin", "on_test_end",
              "on_test_batch_begin", "on_test_batch_end", "on_predict_begin", "on_predict_end",
              "on_predict_batch_begin", "on_predict_batch_end"):
    setattr(StudentCallback, _hook, _forward(_hook))
