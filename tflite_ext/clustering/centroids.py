"""Centroid initialisation and nearest-centroid assignment for 1-D weight values (numpy).

Example:
    >>> import numpy as np
    >>> c = initial_centroids(np.random.randn(500), 8, "kmeans++")
    >>> a = nearest(np.random.randn(500), c)          # index of the closest centroid
"""
import numpy as np

from tflite_ext.errors import InputError

INITS = ("kmeans++", "linear", "density")
MAX_CLUSTERS = 128  # TFLM's LUT indexes at most 7 bits


def check_clusters(clusters, name="clusters"):
    """`clusters` as an int in [2, 128], or a one-line InputError."""
    if isinstance(clusters, bool) or not isinstance(clusters, (int, np.integer)) \
            or not 2 <= clusters <= MAX_CLUSTERS:
        raise InputError(f"{name} must be an integer in [2, {MAX_CLUSTERS}] (TFLite Micro's LUT "
                         f"indexes 1-7 bits). Received: {name}={clusters!r}")
    return int(clusters)


def check_init(init):
    if init not in INITS:
        raise InputError(f"init must be one of {INITS}. Received: init={init!r}")
    return init


def initial_centroids(values, count, init, seed=0):
    """`count` sorted centroids for the 1-D `values` (`len(values) >= count`).

    "linear": evenly spaced from min to max (keeps the rare large weights, which matter);
    "density": equal-mass quantiles; "kmeans++": k-means++ seeding, then Lloyd iterations.
    """
    values = np.asarray(values, np.float64).ravel()
    if init == "linear":
        return np.linspace(values.min(), values.max(), count)
    if init == "density":
        return np.quantile(values, (np.arange(count) + 0.5) / count)
    return _kmeans(values, count, np.random.default_rng(seed))


def _kmeans(values, count, rng, iterations=25):
    centroids = [values[rng.integers(len(values))]]
    for _ in range(1, count):
        d2 = np.min((values[:, None] - np.asarray(centroids)[None]) ** 2, axis=1)
        total = d2.sum()
        # All remaining values sit on a centroid already: spread the rest evenly.
        pick = rng.choice(len(values), p=d2 / total) if total > 0 else rng.integers(len(values))
        centroids.append(values[pick])
    centroids = np.sort(np.asarray(centroids))
    for _ in range(iterations):
        assign = nearest(values, centroids)
        sums = np.bincount(assign, values, minlength=count)
        counts = np.bincount(assign, minlength=count)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(moved, centroids):
            break
        centroids = np.sort(moved)
    return centroids


def nearest(values, centroids):
    """Index of the nearest centroid for each value (centroids need not be sorted)."""
    values = np.asarray(values, np.float64)
    return np.argmin(np.abs(values[..., None] - np.asarray(centroids, np.float64)), axis=-1)
