"""mplp: meta-learning the Message Passing Learning Protocol in JAX.

The modules here are the pure library (networks of agents, learned rules, the inner run,
meta-training, estimators, evaluation, analysis); none imports from `mplp.host`, the job
side (configs, the train loop and run directories, checkpoints, tracking, reports, data
loading, the CLI)."""

from mplp import agents, compiling, episode, evaluation, meta_train, minibatch_init, optim, presets, reference, tasks
from mplp.backprop import BackpropRule
from mplp.episode import Episode, TrainedRule
from mplp.layers import ACTIVATIONS, Activation, Dense, Softmax
from mplp.learned import LearnedRule, MetaParams
from mplp.losses import CrossEntropy, L1, L2
from mplp.meta_train import MetaTrainer, OuterLoss, TrainState
from mplp.network import InnerState, Network
from mplp.tasks import Classification, Sinusoid, Task, TaskSample

__all__ = [
    "ACTIVATIONS", "Activation", "BackpropRule", "Classification", "CrossEntropy", "Dense", "Episode",
    "InnerState", "L1", "L2", "LearnedRule", "MetaParams", "MetaTrainer", "Network", "OuterLoss",
    "Softmax", "Sinusoid", "Task", "TaskSample", "TrainState", "TrainedRule", "agents", "compiling", "episode",
    "evaluation", "meta_train", "minibatch_init", "optim", "presets", "reference", "tasks",
]
