"""Knowledge distillation for compressed models: a thin layer over `keras.distillation`.

The float model teaches its pruned and/or quantization-aware copy in the same `fit`. `distill`
returns a compiled `keras.distillation.Distiller`; train it, then strip/convert
`distiller.student` as usual. The project's callbacks (`PruningCallback`,
`FreezeQuantization`) work on the student when `fit` hands them a Distiller (`student_of`).

Example:
    >>> from tflite_ext import distillation, pruning
    >>> student = pruning.prune(teacher, 0.75, round_to=8)
    >>> distiller = distillation.distill(teacher, student, temperature=4.0, alpha=0.5,
    ...                                  optimizer=keras.optimizers.Adam(5e-4))
    >>> distiller.fit(x, y, epochs=10,
    ...               callbacks=[pruning.PruningCallback()])
    >>> small = pruning.strip(distiller.student)
"""
import keras

from tflite_ext.errors import InputError


def _check_model(name, model):
    if not isinstance(model, keras.Model):
        raise InputError(f"{name} must be a keras.Model. Received: {name}={type(model).__name__}")
    try:
        _ = model.outputs  # an unbuilt subclassed model has none
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
        ...               callbacks=[FreezeQuantization(120)])
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


def student_of(model):
    """The model a layer-level callback works on: `model.student` for a
    `keras.distillation.Distiller`, else `model` itself.

    `PruningCallback` and `FreezeQuantization` call it, so they go straight into
    `distiller.fit(..., callbacks=[...])`: the student's layers are the ones they change.

    Example:
        >>> student_of(distill(teacher, student)) is student
        True
    """
    if isinstance(model, keras.distillation.Distiller):
        return model.student
    return model
