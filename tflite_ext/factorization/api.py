"""`factorize(model, ...)`: an ordinary Keras model with low-rank layer pairs.

Each chosen layer becomes two ordinary layers from the truncated SVD of its kernel:

- Dense (M→K): Dense(R, no bias) named `<name>_svd`, then Dense(K) named `<name>` with the
  bias and the activation;
- 1×1 conv: the same with 1×1 convs, the strides on the first;
- k×k Conv2D (spatial SVD): a kh×1 conv into R channels (`<name>_svd`, the vertical stride,
  dilation and padding), then a 1×kw conv out (`<name>`, the horizontal ones, the bias and the
  activation).

The second layer keeps the original name, so model outputs, distillation hints and
`convert`'s names still find it. Being ordinary layers, the pairs need nothing new downstream:
`prune` sees the R channels as one more dependency group, `quantize_model` treats them as any
Dense/Conv2D (per-channel for convs), and `convert` and TFLite Micro run them.

Example:
    >>> small = factorize(model, param_budget=0.4, round_to=8)   # prints the plan
    >>> small.get_layer("fc1_svd").units
    48
"""
import keras
import numpy as np

from tflite_ext.factorization import svd
from tflite_ext.factorization.plan import plan as make_plan, scheme_of
from tflite_ext.functional import FunctionalGraph, clone_layer, rebuild, unique_names


class _Pair:
    """Two layers called one after the other, standing where one layer was."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, x, **kwargs):
        return self.second(self.first(x))


def _pair_configs(layer, rank, scheme, name):
    """(config of the R-channel layer, config of the output layer)."""
    config = layer.get_config()
    first = dict(config, name=f"{name}_svd", use_bias=False, activation="linear",
                 bias_regularizer=None, activity_regularizer=None)
    second = dict(config, name=name)
    if isinstance(layer, keras.layers.Dense):
        first["units"] = rank
        return first, second
    first["filters"] = rank
    ones = (1,) * len(config["kernel_size"])
    if scheme == "channel":
        second.update(kernel_size=ones, strides=ones, padding="valid", dilation_rate=ones)
        return first, second
    (kh, kw), (sh, sw), (dh, dw) = (config[k] for k in ("kernel_size", "strides",
                                                          "dilation_rate"))
    first.update(kernel_size=(kh, 1), strides=(sh, 1), dilation_rate=(dh, 1))
    second.update(kernel_size=(1, kw), strides=(1, sw), dilation_rate=(1, dw))
    return first, second


def _factorized(layer, rank, scheme, name):
    """(_Pair, init) replacing `layer` by its rank-`rank` factorization."""
    first_cfg, second_cfg = _pair_configs(layer, rank, scheme, name)
    first, second = type(layer).from_config(first_cfg), type(layer).from_config(second_cfg)
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    a, b = svd.split(kernel, rank, scheme)
    bias = [keras.ops.convert_to_numpy(layer.bias)] if layer.use_bias else []

    def init(_):
        first.set_weights([a])
        second.set_weights([b, *bias])
    return _Pair(first, second), init


def _copied(layer, name):
    config = dict(layer.get_config(), name=name) if layer.name != name else None
    new = clone_layer(layer, config)
    weights = layer.get_weights()
    return new, (lambda made: made.set_weights(weights)) if weights else None


def factorize(model, rank=None, energy=None, param_budget=None, mac_budget=None, layers=None,
              round_to=1, skip_unprofitable=True, verbose=True):
    """Returns a copy of `model` with the chosen layers replaced by low-rank pairs.

    The arguments choose layers and ranks as `plan` does (exactly one of `rank`, `energy`,
    `param_budget`, `mac_budget`); `verbose` prints the plan (`print(plan(model, ...))`
    gives it without building). At full rank the copy computes what `model` computes (to
    float rounding); at rank R a layer's kernel error (Frobenius) is the root of the sum of its
    discarded squared singular values. Fine-tune the copy afterwards (a few epochs, a low
    learning rate, ideally taught by `model`: `tflite_ext.distillation`).

    Example:
        >>> small = factorize(model, energy=0.9)
        >>> small = factorize(model, rank={"fc1": 64})
        >>> small = factorize(stripped, mac_budget=0.8, round_to=4)   # after pruning.strip
    """
    chosen = make_plan(model, rank=rank, energy=energy, param_budget=param_budget,
                       mac_budget=mac_budget, layers=layers, round_to=round_to,
                       skip_unprofitable=skip_unprofitable)
    if verbose:
        print(chosen)
    rows = {r.layer: r for r in chosen.rows if r.rank is not None}
    graph = FunctionalGraph(model)
    names = unique_names(graph)

    def make_layer(node):
        row = rows.get(node.layer.name)
        if row is not None:
            return _factorized(node.layer, row.rank, row.scheme, names[node.name])
        return _copied(node.layer, names[node.name])

    return rebuild(graph, make_layer)


def kernel_error(original, factorized, name):
    """Frobenius norm of (original kernel − the product of its pair) for layer `name`.

    Example:
        >>> kernel_error(model, factorize(model, rank={"fc1": 16}), "fc1")
        0.8731
    """
    layer = original.get_layer(name)
    scheme = scheme_of(layer)
    a = keras.ops.convert_to_numpy(factorized.get_layer(f"{name}_svd").kernel)
    b = keras.ops.convert_to_numpy(factorized.get_layer(name).kernel)
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    if scheme == "channel":
        product = a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[-2], -1)
        return float(np.linalg.norm(svd.as_matrix(kernel, scheme) - product))
    kh, _, cin, r = a.shape
    _, kw, _, cout = b.shape
    left = a[:, 0].reshape(kh * cin, r)
    right = b[0].transpose(1, 0, 2).reshape(r, kw * cout)
    return float(np.linalg.norm(svd.as_matrix(kernel, scheme) - left @ right))
