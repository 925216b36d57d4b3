"""A new user's LeNet-style CNN on the embedded digits images learns: ≥ 98% test accuracy."""
import numpy as np

import fastbp
from fastbp.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU


def test_lenet_on_digits_reaches_98_percent():
    x, y = fastbp.datasets.load_digits(as_images=True)          # (1797, 1, 8, 8)
    x_train, x_test, y_train, y_test = fastbp.datasets.train_test_split(x, y, seed=0)
    model = fastbp.Sequential(
        Conv2D(1, 16, 3, padding=1), ReLU(), MaxPool2D(2),       # 16 x 4 x 4
        Conv2D(16, 32, 3, padding=1), ReLU(), MaxPool2D(2),      # 32 x 2 x 2
        Flatten(), Dense(128, 10))
    params = fastbp.init(model, seed=0)
    params, history = fastbp.fit(model, params, x_train, y_train,
                                 loss=fastbp.losses.softmax_cross_entropy,
                                 optimizer=fastbp.optim.adam(3e-3), epochs=12, batch_size=16,
                                 seed=0, progress=False)
    assert params[0]["W"].dtype == np.float32
    assert history["loss"][-1] < history["loss"][0]
    metrics = fastbp.evaluate(model, params, x_test, y_test,
                              loss=fastbp.losses.softmax_cross_entropy)
    assert metrics["accuracy"] >= 0.98, metrics
