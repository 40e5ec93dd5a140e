"""The seam between the project's layer wrappers: one way to look through them.

`PruneWrapper` (pruning) and `QuantizeWrapper` (QAT) both derive from `Wrapper`, and may nest
(`quantize_model(prune(model))` puts a PruneWrapper inside each QuantizeWrapper). Everything
that needs the layer underneath (the channel graph, MACs, importance, strip) or one wrapper
of the stack (the pruning masks, the QAT ranges) asks `layers_of`, `unwrap` or `find`. Keras'
own wrappers (`TimeDistributed`, `Bidirectional`) are not looked through: they change what
the inner layer computes.

`strip` drops the wrappers whose job ends with training (pruning) and asks the others
(`survives_strip`, QAT) for a `sliced` copy of themselves around the smaller inner layer.

Example:
    >>> qp = QuantizeWrapper(PruneWrapper(keras.layers.Conv2D(8, 3)))
    >>> unwrap(qp)
    <Conv2D ...>
    >>> find(qp, PruneWrapper) is qp.layer
    True

Under `tf.distribute` (MirroredStrategy, MultiWorkerMirroredStrategy) each replica runs
`call` on its slice of the global batch, and a non-trainable variable assigned there (a QAT
range, a folded BN statistic, a pruning activation count) updates that replica's own copy
only. The wrappers therefore compute such updates from the whole global batch with
`gather_replicas`, so every copy gets the same value, the one a single device computes.

The callbacks that act on a step schedule (`FreezeQuantization`, `ClusteringCallback`) read
the step from `completed_steps`, the optimizer's iterations, which a `.keras` checkpoint and
`keras.callbacks.BackupAndRestore` restore; pruning counts its own step in the model.
"""
import keras


class Wrapper(keras.layers.Wrapper):
    """Base of the project's wrappers: looked through by `unwrap` and friends.

    Attributes:
        survives_strip: whether `strip` keeps this wrapper (through `sliced`) or drops it.
    """

    survives_strip = False

    def sliced(self, inner, out_keep, name):
        """A copy of this wrapper around `inner` (the layer it wraps, already sliced by
        `strip`) that keeps only the `out_keep` output channels (a boolean mask).

        Returns `(wrapper, init)`: `init(wrapper)` runs once the new wrapper is built and
        copies this one's state (its own weights) into it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not survive strip")

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The wrapper from `get_config()`: the wrapped layer is deserialized first (a
        subclass with more serialized objects deserializes them, then calls this)."""
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(
            config["layer"], custom_objects=custom_objects)
        return cls(**config)


def layers_of(layer):
    """`layer`, then each layer it wraps, outermost first (the project's wrappers only)."""
    while True:
        yield layer
        if not isinstance(layer, Wrapper):
            return
        layer = layer.layer


def unwrap(layer):
    """The layer under any number of the project's wrappers."""
    *_, inner = layers_of(layer)
    return inner


def find(layer, cls):
    """The first layer of type `cls` in `layer`'s wrapper stack, or None."""
    return next((inner for inner in layers_of(layer) if isinstance(inner, cls)), None)


def _replica_context():
    """The `tf.distribute` replica context while `call` runs on one of several replicas,
    else None (one device, cross-replica code, or a backend other than TensorFlow)."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def several_replicas():
    """Whether `call` is running on one of several `tf.distribute` replicas right now."""
    return _replica_context() is not None


def gather_replicas(value):
    """`value` of every replica stacked on a new first axis (replica order), or `value[None]`
    on one device: what a wrapper reduces so that all replicas update a variable alike.

    Example:
        >>> batch_max = ops.max(gather_replicas(ops.max(x)), axis=0)  # over the global batch
    """
    value = keras.ops.expand_dims(value, 0)
    context = _replica_context()
    return value if context is None else context.all_gather(value, axis=0)


def completed_steps(model):
    """The training steps `model` (the one `fit` runs, a Distiller included) has completed:
    its optimizer's iterations. The project's step-scheduled callbacks read this rather
    than count batches themselves, because the optimizer is saved and restored with the
    model (`.keras` files, `keras.callbacks.BackupAndRestore`), so a resumed fit carries on
    at the step it was saved at; a counter in the callback would restart at 0, or run ahead
    of a backup restored from the end of the last epoch.

    Example:
        >>> if completed_steps(self.model) % 100 == 0: ...   # in on_train_batch_end
    """
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))
