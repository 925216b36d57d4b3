"""Layers: immutable hyper-parameter holders implementing the layer protocol.

One module per family: ``core`` (dense, activations, dropout, flatten), ``conv``
(Conv2D, MaxPool2D, AvgPool2D) and ``recurrent`` (RNN, LSTM). See ``core`` for the
protocol.
"""
from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__all__ = list(_core_all)

try:  # filled in by the conv/pool work
    from .conv import *  # noqa: F401,F403
    from .conv import __all__ as _conv_all
    __all__ += list(_conv_all)
except ImportError as _e:  # pragma: no cover
    if "conv" not in str(_e):
        raise

try:  # filled in by the recurrent work
    from .recurrent import *  # noqa: F401,F403
    from .recurrent import __all__ as _rec_all
    __all__ += list(_rec_all)
except ImportError as _e:  # pragma: no cover
    if "recurrent" not in str(_e):
        raise
