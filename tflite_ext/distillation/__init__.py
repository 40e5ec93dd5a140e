"""Knowledge distillation for compressed models, on `keras.distillation`.

The float model teaches its pruned, QAT or smaller copy in the same `fit`. `fit` is the one
call; `distill` returns the compiled `Distiller` for your own `fit`; `DistillationSchedule`
changes the temperature and alpha during training; `hints` add feature losses between named
layers (the names survive `prune`, `quantize_model` and `strip`). The project's callbacks
(`PruningCallback`, `FreezeQuantization`) work on the student when `fit` hands them a Distiller
(`student_of`).

Example:
    >>> from tflite_ext import distillation, pruning
    >>> student, history = distillation.fit(
    ...     teacher, pruning.prune(teacher, 0.75, round_to=8), x, y, epochs=10,
    ...     learning_rate=5e-4, temperature=4.0, alpha=0.5, hints={"relu2": "relu2"},
    ...     callbacks=[distillation.DistillationSchedule(temperature=(8.0, 2.0))])
    >>> small = pruning.strip(student)           # PruningCallback was added for you
"""
from tflite_ext.distillation.distiller import Distiller, LogitsDistillation, student_of
from tflite_ext.distillation.schedule import DistillationSchedule
from tflite_ext.distillation.api import (check_logits, distill, fit,  # noqa: E402,I001
                                         needed_callbacks)

__all__ = ["Distiller", "DistillationSchedule", "LogitsDistillation", "check_logits", "distill",
           "fit", "needed_callbacks", "student_of"]
