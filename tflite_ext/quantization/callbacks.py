"""Freezing the range observers and BN statistics of a QAT model.

Late in QAT, moving ranges and BN statistics should stop moving so that the last epochs train
the weights against the exact int8 grid the converter will write.

Example:
    >>> qat = quantize_model(model)
    >>> qat.fit(x, y, epochs=5, callbacks=[FreezeQuantization(freeze_after_step=150)])
"""
import keras

from tflite_ext import wrapping
from tflite_ext.distillation import student_of
from tflite_ext.errors import InputError
from tflite_ext.quantization.quantizers import ActivationQuantizer
from tflite_ext.quantization.wrapper import QuantizeWrapper


def _quantization_layers(model):
    """The quantizers and wrappers of a QAT model, including a wrapper's own quantizer."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):  # a nested model: look inside
            found.extend(_quantization_layers(layer))
        else:
            # Through the project's wrappers: clustering wraps a QuantizeWrapper.
            layer = wrapping.find(layer, QuantizeWrapper) or layer
            if not isinstance(layer, (ActivationQuantizer, QuantizeWrapper)):
                continue
            found.append(layer)
            if isinstance(layer, QuantizeWrapper):
                found.extend(q for q in (layer.mid_quantizer, layer.logits_quantizer) if q)
    return found


def set_observing(model, ranges=True, batch_norm=True):
    """Turns range observers and folded-BN statistics updates on or off (no retracing).

    Args:
        model: a model returned by `quantize_model`.
        ranges: whether activation ranges keep following the data in training; None leaves
            them as they are.
        batch_norm: whether folded BatchNormalization moving statistics keep updating; None
            leaves them as they are.
    """
    for layer in _quantization_layers(model):
        if isinstance(layer, ActivationQuantizer) and layer.built and ranges is not None:
            layer.observing.assign(1.0 if ranges else 0.0)
        if isinstance(layer, QuantizeWrapper) and layer.built and batch_norm is not None:
            layer.bn_observing.assign(1.0 if batch_norm else 0.0)


def freeze(model):
    """Freezes every range observer and BN statistic of a QAT model."""
    set_observing(model, ranges=False, batch_norm=False)


@keras.saving.register_keras_serializable(package="tflite_ext")
class FreezeQuantization(keras.callbacks.Callback):
    """Freezes ranges and BN statistics once `freeze_after_step` training steps have run.

    Steps are the model's training steps since `compile` (its optimizer's iterations,
    across `fit` calls), so `freeze_after_step=0` freezes before the first step, and a fit
    resumed from a `.keras` checkpoint or `keras.callbacks.BackupAndRestore` freezes at the
    same step as an uninterrupted one. Given a `keras.distillation.Distiller`, it freezes the
    student.

    Args:
        freeze_after_step: number of training steps after which observers stop.
        freeze_ranges: freeze activation ranges (default True).
        freeze_batch_norm: freeze folded BN statistics (default True).
    """

    def __init__(self, freeze_after_step, freeze_ranges=True, freeze_batch_norm=True):
        super().__init__()
        if int(freeze_after_step) != freeze_after_step or freeze_after_step < 0:
            raise InputError("freeze_after_step must be an integer >= 0. "
                             f"Received: freeze_after_step={freeze_after_step}")
        self.freeze_after_step = int(freeze_after_step)
        self.freeze_ranges = freeze_ranges
        self.freeze_batch_norm = freeze_batch_norm
        self.frozen = False

    @property
    def step(self):
        """Training steps the model has completed (see `wrapping.completed_steps`)."""
        return wrapping.completed_steps(self.model)

    def _maybe_freeze(self):
        if not self.frozen and self.step >= self.freeze_after_step:
            # Only what this callback freezes: a second FreezeQuantization (BN statistics
            # first, ranges later) must not turn the other one's part back on.
            set_observing(student_of(self.model), ranges=False if self.freeze_ranges else None,
                          batch_norm=False if self.freeze_batch_norm else None)
            self.frozen = True

    def on_train_begin(self, logs=None):
        # Checked again in this fit: the observer flags are model variables, which a restored
        # backup (a fit resumed with this callback) may have turned back on.
        self.frozen = False
        self._maybe_freeze()

    def on_train_batch_end(self, batch, logs=None):
        self._maybe_freeze()

    def get_config(self):
        return {"freeze_after_step": self.freeze_after_step,
                "freeze_ranges": self.freeze_ranges,
                "freeze_batch_norm": self.freeze_batch_norm}
