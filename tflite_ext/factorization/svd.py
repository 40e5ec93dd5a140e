"""The linear algebra of low-rank factorization: one kernel in, two kernels (or one rebuilt
kernel) out. NumPy only; nothing here knows about Keras layers.

A kernel is seen as a matrix in one of two ways:

- "channel": Dense (M, K) or a 1×1 conv (1.., Cin, Cout) is the matrix Cin × Cout. Rank R
  gives (Cin × R) then (R × Cout): two Dense layers, or two 1×1 convs.
- "spatial" (Jaderberg et al. 2014; the scheme of Qualcomm's AIMET): a kh×kw conv kernel
  (kh, kw, Cin, Cout) is the matrix (kh·Cin) × (kw·Cout) with rows (i, c) and columns
  (j, o). Rank R gives a kh×1 conv Cin → R, then a 1×kw conv R → Cout, whose composition is
  exactly the rank-R matrix.

The singular values are split evenly (√s on each side), so both factors have similar ranges:
what int8 quantization of each wants.

Example:
    >>> w = np.random.randn(64, 32).astype("float32")
    >>> first, second = split(w, 8, "channel")
    >>> first.shape, second.shape
    ((64, 8), (8, 32))
    >>> error = np.linalg.norm(w - first @ second)      # the discarded singular values' norm
    >>> bool(np.isclose(error, np.linalg.norm(singular_values(w, "channel")[8:]), rtol=1e-4))
    True
"""
import numpy as np


def as_matrix(kernel, scheme):
    """The kernel as the matrix whose truncated SVD the scheme takes."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if scheme == "channel":
        return kernel.reshape(-1, kernel.shape[-1])
    kh, kw, cin, cout = kernel.shape
    # rows (i, c), columns (j, o): M[i*cin + c, j*cout + o] = kernel[i, j, c, o]
    return kernel.transpose(0, 2, 1, 3).reshape(kh * cin, kw * cout)


def from_matrix(matrix, shape, scheme):
    """Inverse of `as_matrix`: the kernel of `shape` whose matrix is `matrix`."""
    if scheme == "channel":
        return matrix.reshape(shape)
    kh, kw, cin, cout = shape
    return matrix.reshape(kh, cin, kw, cout).transpose(0, 2, 1, 3)


def singular_values(kernel, scheme):
    """The kernel's singular values, largest first."""
    return np.linalg.svd(as_matrix(kernel, scheme), compute_uv=False)


def max_rank(shape, scheme):
    """The largest rank the kernel's matrix has room for."""
    if scheme == "channel":
        return min(int(np.prod(shape[:-1])), shape[-1])
    kh, kw, cin, cout = shape
    return min(kh * cin, kw * cout)


def split(kernel, rank, scheme):
    """The two kernels of the rank-`rank` factorization, in the layers' own layouts.

    "channel": (…, Cin, R) and (…1, R, Cout) with the leading 1s of a 1×1 conv kept.
    "spatial": (kh, 1, Cin, R) and (1, kw, R, Cout).
    """
    u, s, vt = np.linalg.svd(as_matrix(kernel, scheme), full_matrices=False)
    root = np.sqrt(s[:rank])
    left, right = u[:, :rank] * root, root[:, None] * vt[:rank]  # left @ right: rank R
    shape = np.shape(kernel)
    if scheme == "channel":
        ones = shape[:-2]
        first = left.reshape(*ones, shape[-2], rank)
        second = right.reshape(*(1,) * len(ones), rank, shape[-1])
    else:
        kh, kw, cin, cout = shape
        first = left.reshape(kh, cin, rank)[:, None]                            # (kh, 1, cin, R)
        second = right.reshape(rank, kw, cout).transpose(1, 0, 2)[None]         # (1, kw, R, cout)
    return first.astype(np.float32), second.astype(np.float32)


def reconstruct(kernel, rank, scheme):
    """The kernel's best rank-`rank` approximation, in its own shape (what DeepTwist trains)."""
    u, s, vt = np.linalg.svd(as_matrix(kernel, scheme), full_matrices=False)
    matrix = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return from_matrix(matrix, np.shape(kernel), scheme).astype(np.asarray(kernel).dtype)
