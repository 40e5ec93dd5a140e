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
