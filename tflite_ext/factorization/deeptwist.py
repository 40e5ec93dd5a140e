"""DeepTwist (Lee et al., arXiv 1810.12823): train toward low rank without changing the model.

Every `every` training steps the callback replaces each chosen kernel by its best rank-R
approximation (the SVD `factorize` will take); between twists the weights train freely.
Training settles where the rank-R kernel loses little, and the last twist (at the end of
`fit`) leaves kernels of rank R exactly, so `factorize(model, rank=twist.ranks)` then changes
nothing the model computes.

Example:
    >>> twist = DeepTwist(param_budget=0.4, round_to=8, every=50)
    >>> model.fit(x, y, epochs=5, callbacks=[twist])
    >>> small = factorize(model, rank=twist.ranks)    # exact: the kernels have rank R
"""
import keras

from tflite_ext.distillation import student_of
from tflite_ext.errors import InputError
from tflite_ext.factorization import svd
from tflite_ext.factorization.plan import plan


class DeepTwist(keras.callbacks.Callback):
    """Keras callback: every `every` steps, each chosen kernel becomes its rank-R projection.

    Args:
        rank, energy, param_budget, mac_budget, layers, round_to: how to choose layers and
            ranks, as `factorization.plan` takes them; chosen once, on the weights `fit`
            starts from (a trained model), then kept (`ranks`).
        every: training steps between twists (the paper's distortion step).
        verbose: 1 prints each twist.

    Works in `distiller.fit(...)` too (it twists the student).
    """

    def __init__(self, rank=None, energy=None, param_budget=None, mac_budget=None, layers=None,
                 round_to=1, every=100, verbose=0):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a whole number of steps >= 1. Received: "
                             f"every={every!r}")
        self.choice = dict(rank=rank, energy=energy, param_budget=param_budget,
                           mac_budget=mac_budget, layers=layers, round_to=round_to)
        self.every, self.verbose = every, verbose
        self.ranks = None      # {layer name: rank}, set when training starts
        self._schemes = {}
        self._step = 0

    def on_train_begin(self, logs=None):
        model = student_of(self.model)
        if self.ranks is None:
            chosen = plan(model, **self.choice)
            self.ranks = chosen.ranks
            self._schemes = {r.layer: r.scheme for r in chosen.rows}
        self._layers = [(model.get_layer(name), rank, self._schemes[name])
                        for name, rank in self.ranks.items()]

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every == 0:
            self.twist()

    def on_train_end(self, logs=None):
        self.twist()  # the weights fit returns are exactly rank R

    def twist(self):
        """Projects every chosen kernel onto its rank now."""
        for layer, rank, scheme in self._layers:
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            layer.kernel.assign(svd.reconstruct(kernel, rank, scheme))
        if self.verbose:
            print(f"DeepTwist: step {self._step}, {len(self._layers)} kernels at rank "
                  + ", ".join(f"{layer.name}={rank}" for layer, rank, _ in self._layers))

    def get_config(self):
        return {**{k: v for k, v in self.choice.items() if not callable(v)},
                "every": self.every, "verbose": self.verbose}
