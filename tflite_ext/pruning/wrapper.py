"""`PruneWrapper`: a Keras layer wrapper that holds pruning masks and applies them in `call`.

Channel granularity keeps two non-trainable masks: `in_mask` (one entry per input feature)
and `out_mask` (one per output channel); the wrapped layer computes
`layer(inputs * in_mask) * out_mask`, which is exactly what the layer computes after the
masked rows/columns are physically removed. Unstructured and 2:4 granularity keep one
element-wise `weight_mask` over the kernel and zero the masked weights before each call.

Example:
    >>> w = PruneWrapper(keras.layers.Conv2D(8, 3))
    >>> y = w(np.ones((1, 6, 6, 4), "float32"))
    >>> [v.name for v in w.non_trainable_weights]
    ['in_mask', 'out_mask', 'pruning_step']
"""
import keras
from keras import ops

from tflite_ext import wrapping
from tflite_ext.errors import InputError, UnsupportedLayerError
from tflite_ext.pruning.handlers import handler_for

GRANULARITIES = ("channel", "unstructured", "2:4")


def prunable(layer):
    """Whether `PruneWrapper` can wrap `layer` (its handler says so)."""
    handler = handler_for(layer)
    return handler is not None and handler.prunable


@keras.saving.register_keras_serializable(package="tflite_ext")
class PruneWrapper(wrapping.Wrapper):
    """Masks output channels / input features (or single weights) of the wrapped layer.

    Args:
        layer: a layer whose handler is `prunable` (Conv1D/2D/3D and their transposes,
            DepthwiseConv1D/2D, SeparableConv1D/2D, Dense).
        granularity: "channel", "unstructured" or "2:4".
        schedule: the pruning schedule (kept here so a saved model remembers it).
        policy: dict of pruning settings (importance, scope, min_channels, round_to).
        track_activations: accumulate per-input-feature |x| and zero counts during fit (for
            the mean-activation and APoZ importance).
    """

    def __init__(self, layer, granularity="channel", schedule=None, policy=None,
                 track_activations=False, **kwargs):
        if not prunable(layer):
            raise UnsupportedLayerError(
                "PruneWrapper wraps Conv1D/2D/3D(Transpose), DepthwiseConv1D/2D, "
                "SeparableConv1D/2D or Dense layers. Received: "
                f"layer={layer.name} ({type(layer).__name__})")
        if granularity not in GRANULARITIES:
            raise InputError(f"granularity must be one of {GRANULARITIES}. "
                             f"Received: granularity={granularity!r}")
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.granularity = granularity
        self.schedule = schedule
        self.policy = dict(policy or {})
        self.track_activations = bool(track_activations)

    @property
    def masked_kernel(self):
        """The weight that element-wise masks apply to (pointwise kernel for separable convs)."""
        return handler_for(self.layer).masked_kernel(self.layer)[0]

    @property
    def masked_axis(self):
        """The input axis of `masked_kernel` (along which 2:4 runs)."""
        return handler_for(self.layer).masked_kernel(self.layer)[1]

    def build(self, input_shape):
        super().build(input_shape)
        out_channels = self.layer.compute_output_shape(input_shape)[-1]
        in_features = input_shape[-1]
        mask = dict(initializer="ones", trainable=False)
        self.in_mask = self.add_weight(shape=(in_features,), name="in_mask", **mask)
        self.out_mask = self.add_weight(shape=(out_channels,), name="out_mask", **mask)
        self.pruning_step = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                            trainable=False, name="pruning_step")
        if self.granularity != "channel":
            self.weight_mask = self.add_weight(shape=self.masked_kernel.shape,
                                               name="weight_mask", **mask)
        if self.track_activations:
            zeros = dict(initializer="zeros", trainable=False)
            self.act_abs_sum = self.add_weight(shape=(in_features,), name="act_abs_sum", **zeros)
            self.act_zero_sum = self.add_weight(shape=(in_features,), name="act_zero_sum",
                                                **zeros)
            self.act_count = self.add_weight(shape=(), name="act_count", **zeros)

    def record_training_step(self, inputs):
        """Counts one training step and, if tracked, the input statistics of mean-activation
        and APoZ importance. A QuantizeWrapper around this one calls it in its stead."""
        # The step lives in the model so a `.keras` file saved mid-pruning resumes exactly.
        self.pruning_step.assign_add(1)
        if self.track_activations:
            axes = tuple(range(len(inputs.shape) - 1))
            abs_sum = ops.sum(ops.abs(inputs), axis=axes)
            zero_sum = ops.sum(ops.cast(ops.equal(inputs, 0), inputs.dtype), axis=axes)
            count = ops.sum(ops.ones_like(inputs[..., 0]))
            if wrapping.several_replicas():
                # Each replica sees a slice of the global batch and adds to its own copy of
                # the sums: add the whole batch's, so every copy (and the importance read
                # from it) is what one device accumulates.
                features = abs_sum.shape[-1]
                totals = ops.sum(wrapping.gather_replicas(ops.concatenate(
                    [abs_sum, zero_sum, ops.expand_dims(count, 0)])), axis=0)
                abs_sum, zero_sum = totals[:features], totals[features:2 * features]
                count = totals[-1]
            self.act_abs_sum.assign_add(abs_sum)
            self.act_zero_sum.assign_add(zero_sum)
            self.act_count.assign_add(count)

    def call(self, inputs, training=None):
        if training:
            self.record_training_step(inputs)
        if self.granularity != "channel":
            kernel = self.masked_kernel
            if training:  # the optimizer moved masked weights off zero: put them back
                kernel.assign(kernel * self.weight_mask)
            return self.layer(inputs)
        return self.layer(inputs * self.in_mask) * self.out_mask

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(granularity=self.granularity, policy=self.policy,
                      track_activations=self.track_activations,
                      schedule=keras.saving.serialize_keras_object(self.schedule))
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(config.get("schedule"))
        return super().from_config(config, custom_objects)
