"""Layers: immutable hyper-parameter holders implementing the layer protocol.

One module per family: ``core`` (dense, activations, dropout, flatten), ``conv``
(Conv2D, MaxPool2D, AvgPool2D) and ``recurrent`` (RNN, LSTM). See ``core`` for the
protocol.
"""
from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__all__ = list(_core_all)

from .conv import *  # noqa: F401,F403,E402
from .conv import __all__ as _conv_all  # noqa: E402
from .recurrent import *  # noqa: F401,F403,E402
from .recurrent import __all__ as _rec_all  # noqa: E402

__all__ += list(_conv_all) + list(_rec_all)
