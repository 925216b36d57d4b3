"""fastbp: readable, fast backpropagation with pure-function Numba kernels.

    model = fastbp.Sequential(fastbp.Dense(64, 32), fastbp.ReLU(), fastbp.Dense(32, 10))
    params = fastbp.init(model, seed=0)
    y, cache = fastbp.forward(model, params, x)
    dx, grads = fastbp.backward(model, params, cache, dy)
"""
from . import config  # noqa: F401  (first: prepares threads before Numba starts them)
from .config import get_num_threads, set_num_threads, set_parallel_threshold  # noqa: F401
from . import initializers, datasets  # noqa: F401
from . import layers  # noqa: F401
from .layers import *  # noqa: F401,F403  (Dense, Conv2D, LSTM, ... : see layers.__all__)
from .network import (Sequential, init, forward, backward, predict, count_params,  # noqa: F401
                      grad_norms)
from . import losses, optim  # noqa: F401
from .gradcheck import gradcheck, GradcheckReport  # noqa: F401
from .train import fit, evaluate, EarlyStopping, StopTraining  # noqa: F401
from .io import save, load  # noqa: F401
from .warmup import warmup  # noqa: F401
from . import textdata  # noqa: F401

__version__ = "0.1.0"
