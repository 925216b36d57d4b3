"""fastbp.distributed: one synchronous data-parallel step on a Dask LocalCluster.

Steps per second = 1 / time_step, against the number of workers and the global batch size,
next to the same step run locally (``time_local_step``, what ``fastbp.fit`` does per
batch) and the bare communication of a step (``time_comm``: scatter the params to every
worker — inside the tasks up to 4 MB, else scattered — and bring back one gradient-sized
result per part, no compute). ``track_step_bytes``
is the payload a step moves (params out to each worker + one gradient back per part).

Distribution pays when the compute per step (time_local_step / workers) is large compared
with time_comm, which grows with the model size and the number of workers.
Skipped (NotImplementedError) when dask.distributed is not installed.
"""
import copy

import numpy as np

import fastbp
from fastbp import _tree
from . import smoke

MODELS = {
    # name: (layer sizes, classes)
    "mlp_small": (64, 128, 128, 10),        # 26k params
    "mlp_mnist": (784, 256, 256, 10),       # 270k params
}


def _model(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(fastbp.Dense(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(fastbp.ReLU())
    return fastbp.Sequential(*layers)


class DistributedStep:
    params = smoke((["mlp_small", "mlp_mnist"], [1, 2], [128, 1024]))
    param_names = ["model", "workers", "batch"]
    timeout = 180
    number = 1
    repeat = (5, 20, 60.0)

    def setup(self, model, workers, batch):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise NotImplementedError("dask.distributed is not installed")
        from fastbp import distributed as fd
        sizes = MODELS[model]
        self.model = _model(sizes)
        self.p = fastbp.init(self.model, seed=0)
        rng = np.random.default_rng(0)
        n = 4 * batch
        self.x = rng.standard_normal((n, sizes[0])).astype(np.float32)
        self.y = rng.integers(0, sizes[-1], n)
        self.loss = fastbp.losses.softmax_cross_entropy
        self.opt = fastbp.optim.sgd(0.01)
        self.state = self.opt.init(self.p)
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=":0", silence_logs=50)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(workers, timeout=60)
        data = fd._Shards(self.client, self.model, self.p, self.loss, self.x, self.y, 0, batch)
        self.run = fd._Runner(self.client, data, fd._thread_map(self.client, None))
        self.run.warm(self.model, self.p, self.loss, batch)
        self.idx = rng.permutation(n)[:batch]
        self.task = data.task
        self.nbytes = sum(a.nbytes for a in _tree.leaves(self.p))
        self.nparts = len(fd._split(self.idx, data.offsets))
        self.workers = workers
        for _ in range(2):
            self.time_step(model, workers, batch)
            self.time_comm(model, workers, batch)
        self.time_local_step(model, workers, batch)

    def teardown(self, model, workers, batch):
        self.client.close()
        self.cluster.close()

    def time_step(self, model, workers, batch):
        self.run.sync_step(self.model, self.p, self.state, self.opt, self.loss, self.idx,
                           (0, 0, 0), self.task)

    def time_local_step(self, model, workers, batch):
        xb, yb = self.x[self.idx], self.y[self.idx]
        out, cache = self.model.forward(self.p, xb, train=True, rng=None)
        _, dout = self.loss(out, yb)
        _, grads = fastbp.backward(self.model, self.p, cache, dout, input_grad=False)
        self.opt.update(self.p, grads, self.state)

    def time_comm(self, model, workers, batch):
        (pf,) = self.run._ship(self.p)        # as a step sends them
        # copy.deepcopy: a gradient-sized result, from a function every worker can import
        futs = [self.client.submit(copy.deepcopy, pf, pure=False) for _ in range(self.nparts)]
        self.client.gather(futs)

    def track_step_bytes(self, model, workers, batch):
        return self.nbytes * (self.workers + self.nparts)
    track_step_bytes.unit = "bytes"



class LocalSteps:
    """The local-SGD trade-off (``local_steps=k``): wall time of one epoch against the
    validation loss reached after a fixed number of epochs, on the digits with an MLP,
    2 workers. k = 1 is synchronous SGD (equal to ``fastbp.fit``); larger k communicate
    k times less but average models that drifted apart."""
    params = smoke(([1, 4, 16],))
    param_names = ["local_steps"]
    timeout = 300
    number = 1
    repeat = (3, 5, 60.0)
    EPOCHS = 5

    def setup(self, k):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise NotImplementedError("dask.distributed is not installed")
        from fastbp import distributed as fd
        self.fd = fd
        x, y = fastbp.datasets.load_digits()
        self.xtr, self.xva, self.ytr, self.yva = fastbp.datasets.train_test_split(x, y, seed=0)
        self.model = _model((64, 128, 128, 10))
        self.p = fastbp.init(self.model, seed=0)
        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                    dashboard_address=":0", silence_logs=50)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(2, timeout=60)
        self._fit(k, 1)                                   # warm the workers

    def teardown(self, k):
        self.client.close()
        self.cluster.close()

    def _fit(self, k, epochs):
        return self.fd.fit(self.model, self.p, self.xtr, self.ytr, client=self.client,
                           loss=fastbp.losses.softmax_cross_entropy,
                           optimizer=fastbp.optim.sgd(0.05, momentum=0.9), epochs=epochs,
                           batch_size=64, seed=0, local_steps=k,
                           validation_data=(self.xva, self.yva), progress=False)

    def time_epoch(self, k):
        self._fit(k, 1)

    def track_val_loss(self, k):
        return self._fit(k, self.EPOCHS)[1]["val_loss"][-1]
    track_val_loss.unit = "loss"

    def track_val_accuracy(self, k):
        return self._fit(k, self.EPOCHS)[1]["val_accuracy"][-1]
    track_val_accuracy.unit = "accuracy"
