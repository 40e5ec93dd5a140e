"""`cluster(model)`: weight sharing during fit; `strip_clustering` gives an ordinary model.

The order with the other stages: prune -> strip -> quantize_model -> cluster. `cluster` goes
last because it maps the kernel the wrapped layer reads, whatever that layer does with it
(a `QuantizeWrapper` folds BN into it and fake-quantizes it: per output channel, a channel's
k float values stay at most k int8 values). Pruned zeros (unstructured, baked in by `strip`)
keep a pinned zero centroid.

Example:
    >>> qat = quantize_model(pruning.strip(pruned))
    >>> clustered = cluster(qat, clusters=16, layers=["conv2", "conv3", "fc1", "logits"])
    >>> compile_classifier(clustered, 1e-4).fit(x, y, epochs=5,
    ...     callbacks=[ClusteringCallback(update_every=50), FreezeQuantization(300)])
    >>> final = strip_clustering(clustered)       # QAT model, <= 16 values per channel
    >>> convert.to_tflite(final, lut=True, lut_data=x[:100])
"""
import re

import keras
import numpy as np

from tflite_ext import wrapping
from tflite_ext.clustering import centroids as centroid_lib
from tflite_ext.clustering.wrapper import ClusterWrapper, clusterable, groups_of, kernel_names
from tflite_ext.distillation import student_of
from tflite_ext.errors import InputError
from tflite_ext.functional import (FunctionalGraph, clone_layer, layer_matcher, rebuild,
                                   unique_names)
from tflite_ext.pruning.wrapper import PruneWrapper


def _per_layer(value, name, check):
    """`layer -> value` for an int/bool or a {layer-name regex: value} dict (first match)."""
    if not isinstance(value, dict):
        value = check(value)
        return lambda layer: value
    if not value:
        raise InputError(f"{name} must be a value or a non-empty dict {{layer-name regex: "
                         f"value}}. Received: {name}={value!r}")
    table = [(re.compile(k), check(v)) for k, v in value.items()]

    def lookup(layer):
        names = [part.name for part in wrapping.layers_of(layer)]
        return next((v for p, v in table if any(p.fullmatch(n) for n in names)), None)
    return lookup


def cluster(model, clusters=16, *, per_channel=False, init="kmeans++", layers=None, seed=0):
    """Returns a copy of `model` whose chosen layers share `clusters` values per kernel.

    Train it with `ClusteringCallback()` (assignments refresh on its schedule), then call
    `strip_clustering`.

    Args:
        model: a functional or Sequential model, float or QAT (`quantize_model`), possibly
            stripped after pruning. A model with pruning wrappers must be stripped first.
        clusters: values per kernel (per output channel with `per_channel`), 2..128; a
            pruned zero counts as one of them. A dict {layer-name regex: clusters} sets it
            per layer (first match; a layer no pattern matches is not clustered).
        per_channel: centroids per output channel rather than per tensor; a dict
            {layer-name regex: bool} sets it per layer (unmatched: per tensor).
        init: "kmeans++", "linear" or "density".
        layers: names/regexes, layer classes, or a callable choosing the layers (default:
            every Dense/Conv layer).
        seed: the k-means++ seed.

    Raises:
        InputError: a bad argument, a chosen layer with fewer weights than clusters (per
            tensor or per channel), no layer chosen, or a model already clustered or still
            wrapped for pruning.
    """
    clusters_of = _per_layer(clusters, "clusters", centroid_lib.check_clusters)
    channel_of = _per_layer(per_channel, "per_channel", bool)
    centroid_lib.check_init(init)
    graph = FunctionalGraph(model)
    for node in graph.nodes:
        if wrapping.find(node.layer, ClusterWrapper) is not None:
            raise InputError(f"The model is already clustered. Received: model={model.name}")
        if wrapping.find(node.layer, PruneWrapper) is not None:
            raise InputError("cluster() takes a pruned model after pruning.strip(): a pruning "
                             f"wrapper changes the kernel it clusters. Received: layer="
                             f"{node.layer.name}")
    match = layer_matcher(layers)
    chosen = {n.name for n in graph.nodes if n.inputs and isinstance(n.layer, keras.layers.Layer)
              and clusterable(n.layer) and kernel_names(n.layer) and match(n.layer)
              and clusters_of(n.layer) is not None}
    if not chosen:
        raise InputError(f"layers matched no Dense/Conv layer of the model. Received: "
                         f"layers={layers!r}")
    for name in sorted(chosen):
        layer = graph.node_by_name[name].layer
        _check_size(layer, clusters_of(layer), bool(channel_of(layer)))
    names = unique_names(graph)

    def make_layer(node):
        source = node.layer
        layer = clone_layer(source, {**source.get_config(), "name": names[node.name]})
        if node.name not in chosen:
            return layer, lambda new, src=source: new.set_weights(src.get_weights())
        wrapper = ClusterWrapper(layer, clusters=clusters_of(source),
                                 per_channel=bool(channel_of(source)), init=init, seed=seed,
                                 name=names[node.name])

        def init_wrapper(new, src=source):
            new.layer.set_weights(src.get_weights())
            new.initialize()
        return wrapper, init_wrapper

    return rebuild(graph, make_layer)


def _check_size(layer, clusters, per_channel):
    base = wrapping.unwrap(layer)
    for name in kernel_names(layer):
        shape = getattr(base, name).shape
        per_group = int(np.prod(shape)) // groups_of(name, shape, per_channel)
        if per_group < clusters:
            raise InputError(
                f"layer {layer.name!r} has {per_group} {name} weights per "
                f"{'channel' if per_channel else 'tensor'}, fewer than clusters={clusters}: "
                f"leave it out with layers=[...] or use fewer clusters. Received: "
                f"clusters={clusters}")


def clustering_wrappers(model):
    """Every `ClusterWrapper` of a model (nested models included)."""
    found = []
    for layer in student_of(model).layers:
        if isinstance(layer, keras.Model):
            found += clustering_wrappers(layer)
        elif isinstance(layer, ClusterWrapper):
            found.append(layer)
    return found


def strip_clustering(model):
    """An ordinary model (a QAT one stays QAT) whose kernels hold the clustered values.

    It computes what the clustered model computes in inference, exactly.

    Raises:
        InputError: the model has no clustering wrappers.

    Example:
        >>> final = strip_clustering(clustered)
        >>> len(np.unique(final.get_layer("fc1").kernel.numpy()))   # <= clusters
    """
    graph = FunctionalGraph(model)
    if not any(isinstance(n.layer, ClusterWrapper) for n in graph.nodes):
        raise InputError("strip_clustering() needs a model returned by cluster(); this one has "
                         f"no clustering wrappers. Received: model={model.name}")
    names = unique_names(graph)

    def make_layer(node):
        source = node.layer
        inner = source.layer if isinstance(source, ClusterWrapper) else source
        layer = clone_layer(inner, {**inner.get_config(), "name": names[node.name]})

        def init(new):
            new.set_weights(inner.get_weights())
            if isinstance(source, ClusterWrapper):
                base = wrapping.unwrap(new)
                for name, value in source.clustered_weights().items():
                    getattr(base, name).assign(value.astype("float32"))
        return layer, init

    return rebuild(graph, make_layer)


@keras.saving.register_keras_serializable(package="tflite_ext")
class ClusteringCallback(keras.callbacks.Callback):
    """Refreshes every clustering wrapper's assignments every `update_every` training steps.

    Between refreshes only the centroids move (each by the sum of its weights' gradients);
    a refresh moves each weight to the centroid nearest its latent value. With a
    `keras.distillation.Distiller` it works on the student.

    Steps are the model's training steps since `compile` (its optimizer's iterations), so a
    fit resumed from a `.keras` checkpoint or `keras.callbacks.BackupAndRestore` refreshes
    at the same steps as an uninterrupted one.

    Args:
        update_every: training steps between refreshes (0: never, centroids only).
        stop_after_step: no refresh after this step (None: until the end), so the last
            epochs fine-tune centroids with fixed assignments.
    """

    def __init__(self, update_every=100, stop_after_step=None):
        super().__init__()
        if isinstance(update_every, bool) or not isinstance(update_every, int) \
                or update_every < 0:
            raise InputError("update_every must be an integer >= 0. "
                             f"Received: update_every={update_every!r}")
        self.update_every = update_every
        self.stop_after_step = stop_after_step
        self.moved = 0  # weights moved between clusters, over the refreshes this callback ran

    @property
    def step(self):
        """Training steps the model has completed (see `wrapping.completed_steps`)."""
        return wrapping.completed_steps(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = self.step
        if not self.update_every or step % self.update_every:
            return
        if self.stop_after_step is not None and step > self.stop_after_step:
            return
        self.moved += sum(w.update_assignments() for w in clustering_wrappers(self.model))

    def get_config(self):
        return {"update_every": self.update_every, "stop_after_step": self.stop_after_step}
