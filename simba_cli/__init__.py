"""simba: training-free hierarchical token pruning (Simba) for pretrained Mamba language models.

The data path reads straight through the subpackages:
load (`models`) -> score (`simba.criteria`) -> schedule (`simba.schedule`) -> prune and forward
(`simba.pruned`) -> evaluate (`eval`) -> report (`report`).
"""

__version__ = "0.1.0"
