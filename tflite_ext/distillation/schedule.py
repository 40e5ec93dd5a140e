"""`DistillationSchedule`: changes a Distiller's temperature and alpha during `fit`.

Each value is a constant, a `(start, end)` pair (linear from the first to the last epoch or
step of the fit) or a callable of the epoch or step index (0-based). The callback assigns the
`Distiller`'s variables, which the compiled train function reads at every step.

Example:
    >>> schedule = DistillationSchedule(temperature=(8.0, 2.0), alpha=lambda epoch: 0.1 * epoch)
    >>> distill(teacher, student).fit(x, y, epochs=5, callbacks=[schedule])
    >>> schedule.history[-1]
    (4, 2.0, 0.4)
"""
import numbers

import keras

from tflite_ext.errors import InputError

PER = ("epoch", "step")


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_value(name, value):
    """Raises InputError unless `value` is a valid temperature (> 0) or alpha (in [0, 1])."""
    ok = _is_number(value) and (value > 0 if name == "temperature" else 0 <= value <= 1)
    if not ok:
        expected = "a number > 0" if name == "temperature" else "a number in [0, 1]"
        raise InputError(f"{name} must be {expected}. Received: {name}={value!r}")
    return float(value)


def _check_spec(name, spec):
    """A spec is None, a number, a (start, end) pair or a callable."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, (list, tuple)):
        if len(spec) != 2:
            raise InputError(f"{name} must be a number, a (start, end) pair or a callable of the "
                             f"epoch/step. Received: {name}={spec!r}")
        return tuple(_check_value(name, v) for v in spec)
    return _check_value(name, spec)


@keras.saving.register_keras_serializable(package="tflite_ext")
class DistillationSchedule(keras.callbacks.Callback):
    """Sets the `Distiller`'s temperature and alpha (the ground-truth weight) during `fit`.

    Args:
        temperature: None (leave it), a number, `(start, end)` or `f(index) -> number`.
        alpha: the same, in [0, 1].
        per: "epoch" (values set before each epoch) or "step" (before each batch, the index
            counting batches over the whole fit).
        verbose: 1 prints each new pair of values.

    A callable serializes when Keras can serialize it (an importable function or a registered
    object); constants and pairs always do.

    Attributes:
        history: `(index, temperature, alpha)` each time values were set (None: left as is).
    """

    def __init__(self, temperature=None, alpha=None, per="epoch", verbose=0):
        super().__init__()
        if per not in PER:
            raise InputError(f"per must be one of {PER}. Received: per={per!r}")
        self.temperature = _check_spec("temperature", temperature)
        self.alpha = _check_spec("alpha", alpha)
        self.per, self.verbose = per, verbose
        self.history = []
        self._step = 0

    def _value(self, name, spec, index, last):
        if spec is None or _is_number(spec):
            return spec
        if callable(spec):
            value = spec(index)
            try:
                return _check_value(name, value)
            except InputError as error:
                raise InputError(f"{error} (at {self.per} {index})") from None
        start, end = spec
        return start if last == 0 else start + (end - start) * min(index, last) / last

    def _apply(self, index):
        from tflite_ext.distillation.distiller import Distiller

        distiller = self.model
        if not isinstance(distiller, Distiller):
            raise InputError("DistillationSchedule needs a tflite_ext.distillation.Distiller "
                             "(distill() returns one; Keras' own reads its weights once, at "
                             f"trace time). Received: model={type(distiller).__name__}")
        epochs, steps = self.params.get("epochs") or 1, self.params.get("steps") or 1
        last = epochs - 1 if self.per == "epoch" else epochs * steps - 1
        temperature = self._value("temperature", self.temperature, index, last)
        alpha = self._value("alpha", self.alpha, index, last)
        if temperature is not None:
            if distiller.temperature is None:
                raise InputError("the distiller has no LogitsDistillation whose temperature "
                                 f"could change. Received: temperature={self.temperature!r}")
            distiller.temperature.assign(temperature)
        if alpha is not None:
            distiller.alpha.assign(alpha)
        self.history.append((index, temperature, alpha))
        if self.verbose:
            print(f"DistillationSchedule: {self.per} {index}, temperature {temperature}, "
                  f"alpha {alpha}")

    def on_train_begin(self, logs=None):
        self._step = 0

    def on_epoch_begin(self, epoch, logs=None):
        if self.per == "epoch":
            self._apply(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.per == "step":
            self._apply(self._step)
        self._step += 1

    def get_config(self):
        def spec(value):
            if callable(value):
                return keras.saving.serialize_keras_object(value)
            return list(value) if isinstance(value, tuple) else value
        return {"temperature": spec(self.temperature), "alpha": spec(self.alpha),
                "per": self.per, "verbose": self.verbose}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("temperature", "alpha"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
