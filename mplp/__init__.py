"""mplp: meta-learning the Message Passing Learning Protocol in JAX."""

from mplp import agents, minibatch_init, presets, reference
from mplp.backprop import BackpropRule
from mplp.layers import ACTIVATIONS, Activation, Dense, Softmax
from mplp.learned import LearnedRule, MetaParams
from mplp.losses import CrossEntropy, L1, L2
from mplp.network import InnerState, Network

__all__ = [
    "ACTIVATIONS", "Activation", "BackpropRule", "CrossEntropy", "Dense", "InnerState", "L1",
    "L2", "LearnedRule", "MetaParams", "Network", "Softmax", "agents", "minibatch_init",
    "presets", "reference",
]
