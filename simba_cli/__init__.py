"""simba: training-free hierarchical token pruning (Simba) for pretrained Mamba language models.

The data path reads straight through the subpackages:
load (`models`) -> score (`simba.criteria`) -> schedule (`simba.schedule`) -> prune and forward
(`simba.pruned`) -> evaluate (`eval`) -> report (`report`).
"""

__version__ = "0.1.0"


def version() -> str:
    """The installed distribution's version (simba-cli), or this source tree's when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("simba-cli")
    except PackageNotFoundError:
        return __version__
