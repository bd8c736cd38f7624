"""Data sets and loaders: `load_data(spec)` turns a `DataSpec` into `DataSplits`.

Nothing here downloads: built-in data sets are bundled with dependencies (``mnist-sample``,
``digits``) or read from a data directory (``mnist``, ``fashion-mnist``, ``sst2``,
``cifar10-jpeg``) or from files a recipe names (``imagefolder``, ``text-tsv``); anything
else comes from a ``package.module:function`` that returns its own loaders.
"""

from spiralkit.data.loaders import Loader, TensorLoader
from spiralkit.data.sources import DATA_SOURCES, load_data
from spiralkit.data.spec import DataSpec, DataSplits

__all__ = ["DATA_SOURCES", "DataSpec", "DataSplits", "Loader", "TensorLoader", "load_data"]
