"""`ClusterWrapper`: the wrapped layer computes with weights snapped to shared centroids.

Each clustered kernel keeps, next to the layer's own (latent) kernel, trainable `centroids`
(one row per group: the whole tensor, or each output channel with `per_channel`) and
non-trainable `assignments` (which centroid each weight uses). In `call` the layer runs with
its kernel replaced by `centroids[assignments]` (a `keras.StatelessScope` maps the kernel
variable to that tensor, so any layer, a `QuantizeWrapper` included, computes with it). The
gradient reaching a centroid is the sum over its weights (the gradient of a gather); the
latent kernel gets each weight's own gradient (straight through), so that `update_assignments`
(run by `ClusteringCallback` on a schedule) can move weights between clusters.

A weight that is exactly zero when clustering starts (pruned) gets a centroid of its own that
is pinned at zero and never reassigned: it stays exactly zero, and the zero counts as one of
the `clusters` values.

Example:
    >>> w = ClusterWrapper(keras.layers.Dense(4), clusters=8)
    >>> y = w(np.ones((2, 16), "float32"))
    >>> w.initialize()                    # centroids and assignments from the current kernel
    >>> len(np.unique(w.clustered_weights()["kernel"]))
    8
"""
import keras
import numpy as np
from keras import ops

from tflite_ext import wrapping
from tflite_ext.clustering import centroids as centroid_lib
from tflite_ext.errors import InputError, UnsupportedLayerError

# The kernels a layer's output is made from, by attribute name (biases are not clustered:
# they are int32 in the int8 model, few, and cost accuracy when shared).
KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")
CLUSTERABLE = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
               keras.layers.Conv3D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
               keras.layers.Conv2DTranspose)


def clusterable(layer):
    """Whether `ClusterWrapper` can wrap `layer` (looking through the project's wrappers)."""
    return isinstance(wrapping.unwrap(layer), CLUSTERABLE)


def kernel_names(layer):
    """The attribute names of the clustered kernels of `layer`'s innermost layer."""
    base = wrapping.unwrap(layer)
    return [name for name in KERNELS if isinstance(getattr(base, name, None), keras.Variable)]


def groups_of(name, shape, per_channel):
    """Number of centroid groups: 1, or the output channels (depthwise: in x multiplier)."""
    if not per_channel:
        return 1
    return int(shape[-2] * shape[-1]) if name == "depthwise_kernel" else int(shape[-1])


@keras.saving.register_keras_serializable(package="tflite_ext")
class ClusterWrapper(wrapping.Wrapper):
    """Shares each kernel's values among `clusters` trainable centroids.

    Args:
        layer: Dense, Conv1D/2D/3D, Conv2DTranspose, DepthwiseConv2D or SeparableConv2D,
            possibly inside a `QuantizeWrapper` (cluster the QAT model: `cluster(qat)`).
        clusters: centroids per group, 2..128 (at most 7-bit LUT indices).
        per_channel: one set of centroids per output channel instead of per tensor.
        init: "kmeans++", "linear" or "density" (see `centroids.initial_centroids`).
        seed: seed of the k-means++ draw.
    """

    def __init__(self, layer, clusters=16, per_channel=False, init="kmeans++", seed=0,
                 **kwargs):
        if not clusterable(layer):
            raise UnsupportedLayerError(
                "ClusterWrapper wraps Dense, Conv1D/2D/3D, Conv2DTranspose, DepthwiseConv2D "
                f"or SeparableConv2D layers. Received: layer={layer.name} "
                f"({type(wrapping.unwrap(layer)).__name__})")
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.clusters = centroid_lib.check_clusters(clusters)
        self.per_channel = bool(per_channel)
        self.init = centroid_lib.check_init(init)
        self.seed = int(seed)

    @property
    def _base(self):
        # A property, not an attribute: Keras would track the layer a second time.
        return wrapping.unwrap(self.layer)

    def _kernels(self):
        return [(name, getattr(self._base, name)) for name in kernel_names(self.layer)]

    def build(self, input_shape):
        super().build(input_shape)
        self.cluster_vars = {}
        for name, kernel in self._kernels():
            groups = groups_of(name, kernel.shape, self.per_channel)
            shape = (groups, self.clusters)
            self.cluster_vars[name] = (
                self.add_weight(shape=shape, initializer="zeros", name=f"{name}_centroids"),
                self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                name=f"{name}_pinned"),
                self.add_weight(shape=kernel.shape, initializer="zeros", dtype="int32",
                                trainable=False, name=f"{name}_assignments"))

    # ---- numpy side: initialisation, refresh, the clustered kernels -------------------

    def _grouped(self, name, array):
        groups = groups_of(name, array.shape, self.per_channel)
        return np.reshape(array, (-1, groups))

    def initialize(self):
        """Centroids and assignments from the current kernels (call after setting weights)."""
        for name, kernel in self._kernels():
            centroid_var, pinned_var, assign_var = self.cluster_vars[name]
            values = self._grouped(name, ops.convert_to_numpy(kernel))
            if values.shape[0] < self.clusters:
                raise InputError(
                    f"layer {self.name!r} has {values.shape[0]} {name} weights per "
                    f"{'channel' if self.per_channel else 'tensor'}, fewer than clusters="
                    f"{self.clusters}: leave it out (layers=...), or use fewer clusters"
                    f"{'' if not self.per_channel else ' or per_channel=False'}. Received: "
                    f"clusters={self.clusters}")
            cents = np.zeros((values.shape[1], self.clusters))
            pinned = np.zeros_like(cents)
            assign = np.zeros(values.shape, np.int64)
            for g in range(values.shape[1]):
                cents[g], pinned[g], assign[:, g] = self._init_group(values[:, g])
            offsets = np.arange(values.shape[1]) * self.clusters
            centroid_var.assign(cents.astype("float32"))
            pinned_var.assign(pinned.astype("float32"))
            assign_var.assign(np.reshape(assign + offsets, kernel.shape).astype("int32"))

    def _init_group(self, values):
        zero = values == 0
        pinned = np.zeros(self.clusters)
        free = self.clusters
        if zero.any():  # a pruned zero keeps a centroid of its own, pinned at zero
            pinned[0], free = 1.0, self.clusters - 1
        rest = values[~zero]
        if len(np.unique(rest)) <= free:  # already as few values as centroids
            found = np.unique(rest) if len(rest) else np.zeros(1)
            cents = np.concatenate([found, np.repeat(found[-1:], free - len(found))])
        else:
            cents = centroid_lib.initial_centroids(rest, free, self.init, self.seed)
        cents = np.concatenate([[0.0], cents]) if pinned[0] else cents
        assign = np.where(zero, 0, centroid_lib.nearest(values, np.where(pinned > 0, np.inf,
                                                                         cents)))
        return cents, pinned, assign

    def update_assignments(self):
        """Moves each weight to its nearest centroid (its latent value decides), then sets the
        latent kernel to the clustered values; weights on a pinned zero centroid stay there.
        Returns how many weights changed cluster."""
        changed = 0
        for name, kernel in self._kernels():
            centroid_var, pinned_var, assign_var = self.cluster_vars[name]
            values = self._grouped(name, ops.convert_to_numpy(kernel))
            cents = ops.convert_to_numpy(centroid_var)
            pinned = ops.convert_to_numpy(pinned_var) > 0
            old = self._grouped(name, ops.convert_to_numpy(assign_var))
            free = np.where(pinned, np.inf, cents)                       # (groups, k)
            local = np.argmin(np.abs(values[..., None] - free[None]), axis=-1)
            new = local + np.arange(values.shape[1]) * self.clusters
            stay = pinned.reshape(-1)[old]
            new = np.where(stay, old, new)
            changed += int(np.sum(new != old))
            assign_var.assign(np.reshape(new, kernel.shape).astype("int32"))
            # The latent kernel restarts from the values in use: between refreshes it gathers
            # only recent gradient. Left to drift (Adam moves every weight ~lr a step, noise
            # included), weights crossed to neighbouring centroids by the thousand and a
            # per-tensor clustered QAT digits CNN fell from 0.99 to 0.25 in five epochs.
            table = (cents * (1 - pinned)).reshape(-1)
            kernel.assign(table[np.reshape(new, kernel.shape)].astype("float32"))
        return changed

    def clustered_weights(self):
        """{kernel name: the kernel as the layer computes with it} (numpy)."""
        out = {}
        for name, _ in self._kernels():
            centroid_var, pinned_var, assign_var = self.cluster_vars[name]
            table = (ops.convert_to_numpy(centroid_var)
                     * (1 - ops.convert_to_numpy(pinned_var))).reshape(-1)
            out[name] = table[ops.convert_to_numpy(assign_var)]
        return out

    # ---- the forward pass ---------------------------------------------------------------

    def call(self, inputs, training=None):
        mapping = []
        for name, kernel in self._kernels():
            centroid_var, pinned_var, assign_var = self.cluster_vars[name]
            table = ops.reshape(centroid_var * (1.0 - pinned_var), (-1,))
            weight = ops.take(table, assign_var)
            if training:  # value of the centroids; gradient also to the latent kernel
                weight = weight + (kernel - ops.stop_gradient(kernel))
            mapping.append((kernel, weight))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = self.layer(inputs, training=training)
        # Updates the wrapped layer made (BN statistics, QAT ranges) were held by the scope.
        mapped = {id(kernel) for kernel, _ in mapping}
        for variable in self.layer.variables:
            value = scope.get_current_value(variable)
            if value is not None and id(variable) not in mapped:
                variable.assign(value)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(clusters=self.clusters, per_channel=self.per_channel, init=self.init,
                      seed=self.seed)
        return config

