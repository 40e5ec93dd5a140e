"""Hint (feature) pairs: user layer names resolved through the project's wrappers.

A hint names a layer of the teacher and one of the student by the names the user gave them.
The student may be pruned (`PruneWrapper` keeps the layer's name), quantization-aware
(`QuantizeWrapper` is called `quant_<name>`, a BatchNormalization folded into it has no layer
of its own) or stripped (`strip` keeps names); `resolve` finds the layer whose output is the
named layer's output in each of them.

Example:
    >>> pairs = normalize({"relu2": "relu2"})
    >>> resolve(quantize_model(model), "bn1", "student").name
    'quant_conv1'
"""
import keras

from tflite_ext import wrapping
from tflite_ext.errors import InputError


def normalize(hints):
    """[(teacher name, student name)] from a dict, a list of pairs or None."""
    if hints is None:
        return []
    pairs = list(hints.items()) if isinstance(hints, dict) else hints
    try:
        pairs = [(t, s) for t, s in pairs]
    except (TypeError, ValueError):
        raise InputError("hints must be {teacher layer: student layer} or [(teacher layer, "
                         f"student layer), ...]. Received: hints={hints!r}") from None
    for pair in pairs:
        if not all(isinstance(name, str) and name for name in pair):
            raise InputError(f"hint layer names must be non-empty strings. Received: hint {pair!r}")
    return pairs


def resolve(model, name, role):
    """The top-level layer of `model` whose output is the output of the user's layer `name`.

    Looked up in order: a layer called `name`; a project wrapper around a layer called `name`
    (`quant_conv1` for "conv1"); a QAT wrapper whose folded BatchNormalization is `name`.
    """
    layers = model.layers
    found = next((layer for layer in layers if layer.name == name), None)
    if found is not None:
        return found
    for layer in layers:
        inner = wrapping.unwrap(layer)
        folded = getattr(layer, "batch_norm", None)  # QuantizeWrapper's folded BN
        if inner is not layer and inner.name == name:
            if folded is not None:
                raise InputError(
                    f"hint layer {name!r} of the {role} has BatchNormalization "
                    f"{folded.name!r} folded into it (QAT), so only the normalized output "
                    f"exists: hint {folded.name!r} or a later layer instead. Received: "
                    f"{role} layer {name!r}")
            return layer
        if folded is not None and folded.name == name:
            return layer
    names = [wrapping.unwrap(layer).name for layer in layers]
    raise InputError(f"hint layer {name!r} is not a layer of the {role} {model.name!r} "
                     f"(layers: {names}). Received: {role} layer {name!r}")


def output_of(layer, name, role):
    """The layer's symbolic output (a layer called once), or a one-line InputError."""
    try:
        return layer.output
    except (AttributeError, ValueError):  # shared layers have several outputs
        raise InputError(f"hint layer {name!r} of the {role} must be called exactly once "
                         f"in the model. Received: {role} layer {name!r}") from None


def channel_mask(layer):
    """The `out_mask` variable of a channel-pruning wrapper in `layer`'s stack, or None.

    A pruned (not yet stripped) student computes zeros in its masked channels; the hint loss
    multiplies the teacher's feature by this mask so only the kept channels are compared.
    """
    # pruning sits above distillation (its callbacks import student_of): import at call time.
    from tflite_ext.pruning.wrapper import PruneWrapper

    pruner = wrapping.find(layer, PruneWrapper)
    if pruner is None or pruner.granularity != "channel" or not pruner.built:
        return None
    return pruner.out_mask


def check_shapes(teacher_name, student_name, teacher_out, student_out):
    """One-line InputError when a hint's two features cannot be compared element-wise."""
    t_shape, s_shape = tuple(teacher_out.shape), tuple(student_out.shape)
    if t_shape != s_shape:
        raise InputError(
            f"hint {teacher_name!r} -> {student_name!r}: teacher feature {t_shape} and "
            f"student feature {s_shape} differ; hint layers of the same shape, or distill "
            "before strip() (a pruned, unstripped student keeps the teacher's widths and the "
            f"hint compares its kept channels). Received: hints={{{teacher_name!r}: "
            f"{student_name!r}}}")


def extractor(model, names):
    """A functional model over `model`'s own layers: {"final_output", name: feature}."""
    outputs = {"final_output": model.outputs[0]}
    for name in names:
        outputs[name] = model.get_layer(name).output
    # One input as a tensor, not a list of one: the model is called with what fit gives it.
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=f"{model.name}_features")
