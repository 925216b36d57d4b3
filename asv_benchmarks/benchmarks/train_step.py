"""End-to-end float32 training steps on the DESIGN.md workloads (``fastbp.bench``):
forward, softmax cross-entropy, backward (no input gradient), SGD update."""
from fastbp.bench import WORKLOADS

from . import fastbp_step, smoke


class TrainStep:
    params = smoke([list(WORKLOADS)])
    param_names = ["workload"]
    timeout = 300

    def setup(self, name):
        self.step, self.fwd, self.bwd = fastbp_step(name)

    def time_step(self, name):
        self.step()

    def time_forward(self, name):
        self.fwd()

    def time_backward(self, name):
        self.bwd()

    def peakmem_step(self, name):
        self.step()
