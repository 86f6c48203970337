"""jreg: gradient regularisation and Jacobian-regularised deep equilibrium models.

Modules (see BUILD_NOTES.md, "Architecture"):
  jreg.data                      datasets, iterators with a saveable position
  jreg.train                     TrainState, update step, parallel modes, fit
  jreg.checkpoint, jreg.metrics  orbax checkpoints; JSON-lines/TensorBoard logs
  jreg.gradient_regularization   IGR/EGR: R_IG, penalised gradients
  jreg.deq                       fixed-point solvers, implicit gradients, Jacobian penalty
  jreg.models                    MLPs, ResNets, MDEQ, DEQ-Transformer
"""
__version__ = '0.1.0'
