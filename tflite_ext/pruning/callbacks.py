"""`PruningCallback`: updates the masks of a pruned model during `fit`, by its schedule.

It does work only on pruning steps (the schedule says when): on other steps it just counts.
The step counter and the masks are model variables, so a model saved to `.keras` mid-pruning
reloads and continues with the same masks and step. It also drives a QAT model made from a
pruned one (`quantize_model(prune(model))`): the masks it sets are folded into the
fake-quantized kernels, so pruned channels are exact zeros in the QAT model and the .tflite.

Example:
    >>> pruned = prune(model, PolynomialDecay(0.0, 0.5, 0, 200, frequency=20))
    >>> pruned.compile(...)
    >>> pruned.fit(x, y, epochs=3, callbacks=[PruningCallback()])
"""
import keras

from tflite_ext.distillation import student_of
from tflite_ext.pruning.plan import PruningPlan


@keras.saving.register_keras_serializable(package="tflite_ext")
class PruningCallback(keras.callbacks.Callback):
    """Applies the pruning schedule stored in the model's wrappers during `fit`.

    Args:
        importance: override the importance stored by `prune` (name or `Importance`).
        data: `(x, y)` batch for gradient-based importance ("taylor").
        verbose: 1 prints the sparsity at every pruning step.

    Given a `keras.distillation.Distiller` (`distill(teacher, pruned).fit(...)`), it prunes
    the student.

    Example:
        >>> pruned.fit(x, y, epochs=10, callbacks=[PruningCallback()])
    """

    def __init__(self, importance=None, data=None, verbose=0):
        super().__init__()
        self.importance = importance
        self.data = data
        self.verbose = verbose
        self._plan = None
        self._step = 0
        self._reread = False
        self.history = []  # (step, sparsity) of each pruning step

    def on_train_begin(self, logs=None):
        model = student_of(self.model)  # a Distiller trains its student's layers
        if self._plan is None or self._plan.model is not model:
            self._plan = PruningPlan(model, self.importance)
        self._step = self._plan.step()  # completed steps; wrappers count them in call
        self._reread = True

    def on_train_batch_begin(self, batch, logs=None):
        if self._reread:
            # Read the model's step and masks again at the first batch: a callback listed
            # after this one may have restored them in its own on_train_begin
            # (keras.callbacks.BackupAndRestore resuming an interrupted fit).
            self._reread = False
            self._step = self._plan.step()
            self._plan.reload()
            # Prune before the first batch too, so step 0 of the schedule is honoured.
            if self._step == 0 and not self.history:
                self._maybe_prune(0)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        self._maybe_prune(self._step)
        # The optimizer step moved masked weights off zero: zero them again, so predict and
        # evaluate between and after batches see the sparse kernel.
        self._plan.settle()

    def _maybe_prune(self, step):
        should, sparsity = self._plan.schedule(step)
        if should:
            self._plan.apply(sparsity, self.data)
            self.history.append((step, float(sparsity)))
            if self.verbose:
                print(f"PruningCallback: step {step}, sparsity {sparsity:.3f}")

    def get_config(self):
        return {"importance": self.importance if isinstance(self.importance, str) else None,
                "verbose": self.verbose}
