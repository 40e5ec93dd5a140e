"""Quantization-aware training for Keras 3 (fake quant the TFLite converter reads).

Example:
    >>> from tflite_ext.quantization import quantize_model, FreezeQuantization
    >>> qat = quantize_model(model)
    >>> qat.compile(...); qat.fit(x, y, epochs=5, callbacks=[FreezeQuantization(150)])
"""
from tflite_ext.quantization.api import calibrate, quantize_model
from tflite_ext.quantization.callbacks import FreezeQuantization, freeze, set_observing
from tflite_ext.quantization.quantizers import ActivationQuantizer, quantize_weight
from tflite_ext.quantization.wrapper import QuantizeWrapper

__all__ = ["ActivationQuantizer", "FreezeQuantization", "QuantizeWrapper", "calibrate",
           "freeze", "quantize_model", "quantize_weight", "set_observing"]
