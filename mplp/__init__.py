"""mplp: meta-learning the Message Passing Learning Protocol in JAX."""

from mplp import agents, config, evaluation, meta_train, minibatch_init, optim, presets, reference, tasks
from mplp.backprop import BackpropRule
from mplp.layers import ACTIVATIONS, Activation, Dense, Softmax
from mplp.learned import LearnedRule, MetaParams
from mplp.losses import CrossEntropy, L1, L2
from mplp.meta_train import MetaTrainer, OuterLoss, TrainState
from mplp.network import InnerState, Network
from mplp.tasks import Classification, Sinusoid, Task, TaskSample

__all__ = [
    "ACTIVATIONS", "Activation", "BackpropRule", "Classification", "CrossEntropy", "Dense",
    "InnerState", "L1", "L2", "LearnedRule", "MetaParams", "MetaTrainer", "Network", "OuterLoss",
    "Softmax", "Sinusoid", "Task", "TaskSample", "TrainState", "agents", "config", "evaluation",
    "meta_train", "minibatch_init", "optim", "presets", "reference", "tasks",
]
