"""Models: MLP, CIFAR ResNets, MDEQ, DEQ-Transformer, adaptive softmax.

Submodules are imported explicitly (`from jreg.models import deq_transformer`);
this package imports none of them eagerly.
"""
