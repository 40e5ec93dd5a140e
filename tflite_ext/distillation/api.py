"""`distill` (a compiled Distiller) and `fit` (the one call: build, train, return the student).

Example:
    >>> student, history = fit(float_model, pruning.prune(float_model, 0.75), x, y, epochs=10,
    ...                        learning_rate=5e-4, hints={"relu2": "relu2"})
    >>> small = pruning.strip(student)
"""
import math
import numbers

import keras

from tflite_ext import tracing, wrapping
from tflite_ext.distillation import hints as hints_lib
from tflite_ext.distillation.distiller import Distiller, LogitsDistillation
from tflite_ext.errors import InputError


def _check_model(name, model):
    if not isinstance(model, keras.Model):
        raise InputError(f"{name} must be a keras.Model. Received: {name}={type(model).__name__}")
    try:
        _ = model.outputs  # an unbuilt subclassed model has none
    except AttributeError:
        raise InputError(f"{name} must be built (a functional model, or call it once). "
                         f"Received: {name}={model.name!r}") from None


def _shapes(tensors):
    return [tuple(t.shape) for t in tensors]


def _check_pair(teacher, student):
    t_out, s_out = _shapes(teacher.outputs), _shapes(student.outputs)
    if len(t_out) != 1 or len(s_out) != 1 or t_out != s_out:
        shown = lambda s: s[0] if len(s) == 1 else s  # noqa: E731
        raise InputError("teacher and student must have one output of the same shape. Received: "
                         f"teacher output {shown(t_out)}, student output {shown(s_out)}")
    t_in, s_in = _shapes(teacher.inputs), _shapes(student.inputs)
    if t_in != s_in:
        raise InputError("teacher and student must take the same inputs. Received: teacher "
                         f"inputs {t_in}, student inputs {s_in}")
    check_logits(teacher)


def check_logits(model, role="teacher"):
    """Raises a one-line InputError if `model`'s output layer applies a softmax: distillation
    reads its outputs as logits.

    Example:
        >>> check_logits(keras.applications.MobileNetV2(weights=None))  # raises
    """
    head = _softmax_head(model)
    if head:
        raise InputError(
            f"The {role} must output logits, but its output layer {head!r} ends in softmax: "
            "the soft targets and the from_logits loss would read probabilities as logits. "
            "Build it with activation=None (keras.applications: classifier_activation=None) "
            "and apply softmax after conversion")


def _softmax_head(model):
    """The name of the layer that makes `model`'s output, if it applies a softmax."""
    from tflite_ext.functional import FunctionalGraph
    from tflite_ext.pruning.handlers import activation_name

    try:
        graph = FunctionalGraph(model)
    except InputError:
        return None  # subclassed: no graph to read its head from
    node = next(n for n in graph.nodes if graph.outputs[0] in n.outputs)
    layer = wrapping.unwrap(node.layer)
    if isinstance(layer, keras.layers.Softmax) or activation_name(layer) == "softmax":
        return layer.name
    return None


def _check_number(name, value, low, high=None, open_low=False):
    # NaN compares False with every bound, and inf is no rate or weight: both refused here
    number = isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        math.isfinite(value)
    if not number or (value <= low if open_low else value < low) or \
            (high is not None and value > high):
        expected = (f"a number > {low}" if open_low else f"a number >= {low}") if high is None \
            else f"a number in [{low}, {high}]"
        raise InputError(f"{name} must be {expected}. Received: {name}={value!r}")
    return float(value)


def _frozen_copy(teacher):
    """A copy of a functional or Sequential teacher (Keras' Distiller sets `trainable = False`
    on the teacher it is given, and a later `prune` or `quantize_model` of the caller's model
    would carry the flag into its copies); a subclassed one is used as it is."""
    try:
        frozen = keras.models.clone_model(teacher)
        frozen.set_weights(teacher.get_weights())
        return frozen
    except (TypeError, ValueError, NotImplementedError):
        return teacher


def distill(teacher, student, *, temperature=4.0, alpha=0.5, optimizer="adam", loss=None,
            metrics=("accuracy",), hints=None, hint_weight=1.0, hint_loss="mse"):
    """Returns a compiled `Distiller` (a `keras.distillation.Distiller`) teaching `student`.

    The loss is `alpha * loss(y, student) + (1 - alpha) * (T^2 * KL(softmax(teacher / T) ||
    softmax(student / T)) + hint_weight * sum over hints of hint_loss(teacher feature, student
    feature))`. Both models output logits. The teacher runs in inference mode, frozen; a
    functional or Sequential teacher is copied first, so the model you pass stays trainable.
    `DistillationSchedule` changes T and alpha during fit.

    Args:
        teacher: trained `keras.Model` (e.g. the float model).
        student: `keras.Model` with the same input and output shapes (e.g. a pruned, QAT or
            smaller copy).
        temperature: softmax temperature T > 0 for the soft targets.
        alpha: weight in [0, 1] of the ground-truth loss; 1 - alpha weighs the teacher's.
        optimizer: optimizer instance or name; its variables are made here, for the
            student's trainable variables (set `trainable` flags before).
        loss: ground-truth loss; default sparse categorical cross-entropy on logits.
        metrics: metrics on the student's predictions.
        hints: feature pairs `{teacher layer: student layer}` or `[(teacher, student), ...]`,
            by the names you gave the layers (found through pruning and QAT wrappers; a QAT
            conv with a folded BatchNormalization is hinted by the BN's name). Their outputs
            must have the same shape; a pruned, unstripped student compares its kept channels.
        hint_weight: weight >= 0 of each hint loss next to the logits loss.
        hint_loss: a Keras loss (name or instance) between the two features.

    Example:
        >>> distiller = distill(float_model, quantize_model(small), temperature=4.0, alpha=0.5,
        ...                     optimizer=keras.optimizers.Adam(3e-5))
        >>> distiller.fit(x, y, epochs=5,
        ...               callbacks=[FreezeQuantization(120)])
        >>> int8 = convert.to_tflite(distiller.student).flatbuffer
    """
    _check_model("teacher", teacher)
    _check_model("student", student)
    temperature = _check_number("temperature", temperature, 0, open_low=True)
    alpha = _check_number("alpha", alpha, 0, 1)
    hint_weight = _check_number("hint_weight", hint_weight, 0)
    _check_pair(teacher, student)
    pairs = hints_lib.normalize(hints)
    try:
        hint_loss_fn = keras.losses.get(hint_loss)
    except ValueError:
        raise InputError(f"hint_loss must be a Keras loss. Received: hint_loss={hint_loss!r}") \
            from None
    losses = [LogitsDistillation(temperature=temperature, loss=keras.losses.KLDivergence())]
    # A KLDivergence *instance*: with the string "kl_divergence" Keras applies KL to the
    # scaled logits instead of to their softmax.
    losses += [keras.distillation.FeatureDistillation(hint_loss_fn, t, s) for t, s in pairs]
    distiller = Distiller(teacher=_frozen_copy(teacher), student=student,
                          distillation_losses=losses,
                          distillation_loss_weights=[1.0] + [hint_weight] * len(pairs),
                          student_loss_weight=alpha)
    distiller.compile(
        optimizer=optimizer,
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # "accuracy" as an object: the string is built inside fit's first trace, which then
        # traces again (`tracing`)
        metrics=[tracing.accuracy() if m == "accuracy" and loss is None else m
                 for m in metrics] if metrics else None,
    )
    return tracing.build_optimizer(distiller)  # then fit traces its train step once, not twice


def needed_callbacks(student, callbacks):
    """The project's callbacks `fit` adds: a `PruningCallback()` for a student with pruning
    wrappers when `callbacks` has none (a pruned model trained without it never prunes).
    Nothing for QAT: when to freeze ranges (`FreezeQuantization(step)`) is a choice."""
    # pruning sits above distillation (its callbacks import student_of): import at call time.
    from tflite_ext.pruning import PruneWrapper, PruningCallback

    pruned = any(wrapping.find(layer, PruneWrapper) for layer in student.layers)
    if pruned and not any(isinstance(c, PruningCallback) for c in callbacks):
        return [PruningCallback()]
    return []


def fit(teacher, student, x, y=None, *, epochs=1, batch_size=32, learning_rate=1e-3,
        temperature=4.0, alpha=0.5, hints=None, hint_weight=1.0, callbacks=(),
        validation_data=None, auto_callbacks=True, verbose=0, **distill_args):
    """`teacher` teaches `student` in one call; returns `(student, history)`.

    Builds `distill(teacher, student, ...)` with `Adam(learning_rate)`, fits it on `x`, `y`
    and returns the trained student (the same object, trained in place) and Keras' History.
    With `auto_callbacks` a student with pruning wrappers and no `PruningCallback` in
    `callbacks` gets one (`needed_callbacks`); nothing else is added: a QAT student's
    `FreezeQuantization` step is yours to choose.

    Args:
        teacher, student: as for `distill` (same input and output shapes).
        x, y: training inputs and integer labels (or a dataset in `x`, `y=None`).
        learning_rate: a float or a `keras.optimizers.schedules` schedule.
        temperature, alpha, hints, hint_weight: as for `distill`; `DistillationSchedule` in
            `callbacks` changes T and alpha during the fit.
        callbacks: Keras callbacks (`PruningCallback`, `FreezeQuantization` work on the
            student).
        validation_data: passed to `fit`; the logs' `val_accuracy` is the student's.
        distill_args: more `distill` arguments (`loss`, `metrics`, `hint_loss`).

    Example:
        >>> qat = quantize_model(pruning.prune(float_model, 0.75))
        >>> qat, history = fit(float_model, qat, x, y, epochs=20, learning_rate=5e-4,
        ...                    callbacks=[FreezeQuantization(600)])   # PruningCallback added
        >>> int8 = convert.to_tflite(pruning.strip(qat)).flatbuffer
    """
    callbacks = list(callbacks)
    if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        _check_number("learning_rate", learning_rate, 0, open_low=True)
    distiller = distill(teacher, student, temperature=temperature, alpha=alpha,
                        optimizer=keras.optimizers.Adam(learning_rate), hints=hints,
                        hint_weight=hint_weight, **distill_args)
    if auto_callbacks:
        callbacks = needed_callbacks(student, callbacks) + callbacks
    history = distiller.fit(x, y, epochs=epochs, batch_size=batch_size, callbacks=callbacks,
                            validation_data=validation_data, verbose=verbose)
    return student, history
