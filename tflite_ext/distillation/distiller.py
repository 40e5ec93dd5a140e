"""`Distiller`: Keras' Distiller with a schedulable temperature and alpha and one student pass.

`keras.distillation.Distiller` reads `student_loss_weight` as a Python float when `fit` traces
its train function (`if weight > 0`), and `LogitsDistillation.temperature` likewise, so
changing either during `fit` changes nothing. Here both are non-trainable variables the
compiled function reads at every step (`DistillationSchedule` assigns them). With hint
(feature) losses Keras' Distiller also runs the student twice per step (once for the
prediction, once in its feature extractor), which counts every pruning step twice and moves
BatchNormalization and QAT range statistics twice; this one takes the prediction and the hint
features from one pass.

The loss is Keras': `alpha * loss(y, student) + (1 - alpha) * sum_i w_i * L_i(teacher,
student)`, each `L_i` a `keras.distillation` loss (`LogitsDistillation`: `T^2 * KL` of the
softened outputs; `FeatureDistillation`: e.g. MSE of two named layers' outputs), plus the
student's own regularization losses (which Keras' Distiller leaves out, training alone keeps).

Example:
    >>> logits = LogitsDistillation(4.0, keras.losses.KLDivergence())
    >>> hint = keras.distillation.FeatureDistillation("mse", "relu2", "relu2")
    >>> distiller = Distiller(teacher, student, [logits, hint],
    ...                       distillation_loss_weights=[1.0, 0.1], student_loss_weight=0.5)
    >>> distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> distiller.temperature.assign(2.0)   # read by the next training step
"""
import keras
from keras import ops

from tflite_ext.distillation import hints as hints_lib
from tflite_ext.errors import InputError


@keras.saving.register_keras_serializable(package="tflite_ext")
class LogitsDistillation(keras.distillation.LogitsDistillation):
    """`keras.distillation.LogitsDistillation` whose temperature may be a variable.

    `Distiller` binds it to its `temperature` variable; the config holds the current value.
    """

    def get_config(self):
        config = super().get_config()
        config["temperature"] = float(ops.convert_to_numpy(self.temperature))
        return config


def _is_hint(loss):
    return isinstance(loss, keras.distillation.FeatureDistillation) and (
        loss.teacher_layer_name is not None or loss.student_layer_name is not None)


@keras.saving.register_keras_serializable(package="tflite_ext")
class Distiller(keras.distillation.Distiller):
    """`keras.distillation.Distiller` whose `temperature` and `alpha` change during `fit`.

    Same arguments as Keras'. Hint layers (`FeatureDistillation` layer names) are the user's
    names, looked up through the project's wrappers (`hints.resolve`: "conv1" finds a pruned
    "conv1" and a QAT "quant_conv1"); the resolved names are stored. A hint on a channel-pruned
    layer compares only its kept channels (the teacher's feature is multiplied by the mask).

    Attributes:
        alpha: variable, the ground-truth weight (`student_loss_weight` reads and sets it).
        temperature: variable shared by every `LogitsDistillation` of the distiller (None if
            there is none).
    """

    def __init__(self, teacher, student, distillation_losses, distillation_loss_weights=None,
                 student_loss_weight=0.5, name="distiller", **kwargs):
        losses = list(distillation_losses) if isinstance(distillation_losses, (list, tuple)) \
            else [distillation_losses]
        losses = [LogitsDistillation.from_config(loss.get_config())
                  if type(loss) is keras.distillation.LogitsDistillation else loss
                  for loss in losses]
        hint_layers = self._resolve_hints(teacher, student, [x for x in losses if _is_hint(x)])
        super().__init__(teacher, student, losses, distillation_loss_weights,
                         student_loss_weight, name=name, **kwargs)
        self.alpha = self.add_weight(name="alpha", shape=(), trainable=False,
                                     initializer=keras.initializers.Constant(self._initial_alpha))
        temperatures = {float(x.temperature) for x in losses
                        if isinstance(x, keras.distillation.LogitsDistillation)}
        if len(temperatures) > 1:
            raise InputError("Distiller's LogitsDistillation losses share one temperature. "
                             f"Received: temperatures={sorted(temperatures)}")
        self.temperature = None
        if temperatures:
            self.temperature = self.add_weight(
                name="temperature", shape=(), trainable=False,
                initializer=keras.initializers.Constant(temperatures.pop()))
            for loss in losses:
                if isinstance(loss, LogitsDistillation):
                    loss.temperature = self.temperature  # read at every step, not traced once
        teacher_names = sorted({x.teacher_layer_name for x in losses if _is_hint(x)} - {None})
        student_names = sorted({x.student_layer_name for x in losses if _is_hint(x)} - {None})
        self._teacher_features = hints_lib.extractor(teacher, teacher_names) \
            if teacher_names else None
        self._student_features = hints_lib.extractor(student, student_names) \
            if student_names else None
        masks = {n: hints_lib.channel_mask(hint_layers[n]) for n in student_names}
        # Not tracked: the masks are the student's variables, the pending features one step's.
        object.__setattr__(self, "_masks", {n: m for n, m in masks.items() if m is not None})
        object.__setattr__(self, "_pending", None)

    @staticmethod
    def _resolve_hints(teacher, student, hint_losses):
        """Rewrites each hint's layer names to the layers found; {student name: layer}."""
        found = {}
        for loss in hint_losses:
            t_user, s_user = loss.teacher_layer_name, loss.student_layer_name
            if t_user is None or s_user is None:
                raise InputError("a hint names a layer in both models. Received: "
                                 f"teacher layer {t_user!r}, student layer {s_user!r}")
            t_layer = hints_lib.resolve(teacher, t_user, "teacher")
            s_layer = hints_lib.resolve(student, s_user, "student")
            hints_lib.check_shapes(t_user, s_user, hints_lib.output_of(t_layer, t_user, "teacher"),
                                   hints_lib.output_of(s_layer, s_user, "student"))
            loss.teacher_layer_name, loss.student_layer_name = t_layer.name, s_layer.name
            found[s_layer.name] = s_layer
        return found

    @property
    def student_loss_weight(self):
        alpha = self.__dict__.get("alpha")
        return self._initial_alpha if alpha is None else float(ops.convert_to_numpy(alpha))

    @student_loss_weight.setter
    def student_loss_weight(self, value):
        if self.__dict__.get("alpha") is None:  # Keras' __init__ sets it before ours makes alpha
            self._initial_alpha = float(value)
        else:
            self.alpha.assign(float(value))

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        self._labels_loss = keras.losses.get(loss) if isinstance(loss, str) else loss
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:  # Keras' compile config holds loss=None: the ground-truth loss is ours
            config["loss"] = keras.saving.serialize_keras_object(self._labels_loss)
        return config

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))
        # The student is built, so the optimizer can be: the saved optimizer state then loads.
        self.optimizer.build(self.trainable_variables)

    def call(self, inputs, training=None, **kwargs):
        if self._student_features is None:
            return self.student(inputs, training=training, **kwargs)
        features = self._student_features(inputs, training=training)
        # compute_loss of the same step takes the hint features from here: one student pass.
        object.__setattr__(self, "_pending", features)
        return features["final_output"]

    def _student_outputs(self, x, y_pred, training):
        pending = self._pending
        object.__setattr__(self, "_pending", None)
        if self._student_features is None:
            return {"final_output": y_pred}
        if pending is not None and pending["final_output"] is y_pred:
            return pending
        return self._student_features(x, training=training)  # compute_loss called on its own

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        student = self._student_outputs(x, y_pred, training)
        teacher = (self._teacher_features(x, training=False) if self._teacher_features
                   else {"final_output": self.teacher(x, training=False)})
        student_loss = 0.0
        if y is not None:
            student_loss = ops.mean(self._labels_loss(y, student["final_output"]))
        distillation_loss = 0.0
        for loss, weight in zip(self.distillation_losses, self.distillation_loss_weights):
            t_name = getattr(loss, "teacher_layer_name", None) or "final_output"
            s_name = getattr(loss, "student_layer_name", None) or "final_output"
            t_out, s_out = teacher[t_name], student[s_name]
            if s_name in self._masks:  # pruned channels: zero on both sides
                t_out = ops.multiply(t_out, self._masks[s_name])
            distillation_loss = ops.add(distillation_loss,
                                        ops.multiply(weight, loss.compute_loss(t_out, s_out)))
        alpha = ops.convert_to_tensor(self.alpha)
        total = ops.add(ops.multiply(alpha, student_loss),
                        ops.multiply(ops.subtract(1.0, alpha), distillation_loss))
        if self.student.losses:  # weight regularizers: the student keeps them when distilled
            total = ops.add(total, ops.sum(ops.stack(self.student.losses)))
        self.student_loss_tracker.update_state(student_loss)
        self.distillation_loss_tracker.update_state(distillation_loss)
        self.total_loss_tracker.update_state(total)
        return total

    def get_config(self):
        config = super().get_config()
        config["student_loss_weight"] = self.student_loss_weight  # the current value
        return config


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
