"""Weight clustering (Deep Compression's weight sharing) for Keras 3, during `fit`.

`cluster` wraps layers so their kernels use `clusters` shared values (per tensor or per output
channel); `ClusteringCallback` refreshes which weight uses which value; `strip_clustering`
returns an ordinary model. After int8 conversion each kernel (or channel) has at most
`clusters` distinct values, which `convert.to_tflite(..., lut=True)` stores as packed indices
plus a value table for TensorFlow Lite Micro.

Example:
    >>> from tflite_ext import clustering
    >>> clustered = clustering.cluster(qat_model, clusters=16)
    >>> clustered.fit(x, y, epochs=3, callbacks=[clustering.ClusteringCallback(50)])
    >>> final = clustering.strip_clustering(clustered)
"""
from tflite_ext.clustering.api import (ClusteringCallback, cluster, clustering_wrappers,
                                       strip_clustering)
from tflite_ext.clustering.centroids import INITS, MAX_CLUSTERS
from tflite_ext.clustering.wrapper import ClusterWrapper

__all__ = ["cluster", "strip_clustering", "ClusteringCallback", "ClusterWrapper",
           "clustering_wrappers", "INITS", "MAX_CLUSTERS"]
