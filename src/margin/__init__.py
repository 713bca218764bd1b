"""margin: Retrieval-Augmented Generation (Lewis et al., 2020), faithful to the paper."""

from margin.errors import MarginError

__version__ = "0.1.0"

__all__ = ["MarginError", "__version__"]
