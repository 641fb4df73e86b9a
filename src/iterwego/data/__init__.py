"""Data: dataset readers, synthetic stories, pair exports, backbone features and their on-disk cache.

The readers' public names are re-exported here (``from iterwego.data import load_split``).
"""

from .readers import *  # noqa: F401,F403
from .readers import __all__  # noqa: F401
