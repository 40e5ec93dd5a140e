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

from tflite_ext.errors import InputError, UnsupportedLayerError

GRANULARITIES = ("channel", "unstructured", "2:4")
SUPPORTED = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
             keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
             keras.layers.SeparableConv1D, keras.layers.SeparableConv2D, keras.layers.Dense)


def masked_kernel(layer):
    """The weight that element-wise masks apply to (pointwise kernel for separable convs)."""
    pointwise = getattr(layer, "pointwise_kernel", None)
    return layer.kernel if pointwise is None else pointwise


@keras.saving.register_keras_serializable(package="tflite_ext")
class PruneWrapper(keras.layers.Wrapper):
    """Masks output channels / input features (or single weights) of the wrapped layer.

    Args:
        layer: a Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D or Dense layer.
        granularity: "channel", "unstructured" or "2:4".
        schedule: the pruning schedule (kept here so a saved model remembers it).
        policy: dict of pruning settings (importance, scope, min_channels, round_to).
        track_activations: accumulate per-input-feature |x| and zero counts during fit (for
            the mean-activation and APoZ importance).
    """

    def __init__(self, layer, granularity="channel", schedule=None, policy=None,
                 track_activations=False, **kwargs):
        if not isinstance(layer, SUPPORTED):
            raise UnsupportedLayerError(
                "PruneWrapper wraps Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D or "
                f"Dense layers. Received: layer={layer.name} ({type(layer).__name__})")
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
    def tflite_ext_inner(self):
        """The wrapped layer (the dependency graph looks through the wrapper)."""
        return self.layer

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
            self.weight_mask = self.add_weight(shape=masked_kernel(self.layer).shape,
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
            self.act_abs_sum.assign_add(ops.sum(ops.abs(inputs), axis=axes))
            self.act_zero_sum.assign_add(
                ops.sum(ops.cast(ops.equal(inputs, 0), inputs.dtype), axis=axes))
            self.act_count.assign_add(ops.sum(ops.ones_like(inputs[..., 0])))

    def call(self, inputs, training=None):
        if training:
            self.record_training_step(inputs)
        if self.granularity != "channel":
            kernel = masked_kernel(self.layer)
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
        config["layer"] = keras.saving.deserialize_keras_object(
            config["layer"], custom_objects=custom_objects)
        config["schedule"] = keras.saving.deserialize_keras_object(config.get("schedule"))
        return cls(**config)


def prune_wrapper_of(layer):
    """The `PruneWrapper` that is `layer` or sits inside it, or None.

    Other wrappers are looked through: `quantize_model(prune(model))` puts each `PruneWrapper`
    inside a `QuantizeWrapper`, whose kernels then carry the pruning masks.
    """
    while isinstance(layer, keras.layers.Wrapper):
        if isinstance(layer, PruneWrapper):
            return layer
        layer = layer.layer
    return None
