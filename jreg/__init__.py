"""jreg: gradient regularisation and Jacobian-regularised deep equilibrium models.

`import jreg` gives the public modules (docs/api.md lists what each exports)::

  jreg.deq                       fixed-point solvers, implicit gradients,
                                 Jacobian penalty, the Haiku `DEQ` layer
  jreg.gradient_regularization   IGR/EGR: R_IG, λ, penalised gradients
  jreg.train                     TrainState, update step, parallel modes, `fit`
  jreg.data                      datasets, iterators with a saveable position
  jreg.models                    model families (submodules, imported on use)

Importing jreg changes no global state: no matplotlib backend switch, no
logging handlers or filters. Figures are drawn by `jreg.plotting`, which is
imported on its own (`from jreg import plotting`).
"""
import logging as _logging

# orbax (imported by jreg.train for checkpoints) logs through absl while it is
# imported, and absl calls `logging.basicConfig()` when the root logger has no
# handler yet, which would leave a stderr handler on the user's root logger. A
# NullHandler held on the root logger during the imports prevents that.
_import_guard = _logging.NullHandler()
_logging.root.addHandler(_import_guard)
try:
  from jreg import data  # pylint: disable=g-import-not-at-top
  from jreg import deq
  from jreg import gradient_regularization
  from jreg import models
  from jreg import train
finally:
  _logging.root.removeHandler(_import_guard)
  del _import_guard

__version__ = '0.1.0'

__all__ = ('data', 'deq', 'gradient_regularization', 'models', 'train')
