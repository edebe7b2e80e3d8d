"""The networks and rules of the three published experiments.

Each preset returns a `Network` (inner architecture + rule) for a given inner batch
size; the task and outer-loop settings live with the meta-training configs.
"""

from __future__ import annotations

from typing import Callable, Dict

from mplp.layers import Activation, Dense, Softmax
from mplp.learned import LearnedRule
from mplp.losses import CrossEntropy, L2
from mplp.network import Network


def sinusoid_5x10(activation: str = "relu") -> Network:
  """1-20-20-1 relu, L2; stateful agents, M = 8, hidden 15, per-layer networks."""
  layers = (Dense(20), Activation(activation), Dense(20), Activation(activation), Dense(1), L2())
  return Network(1, layers, LearnedRule("stateful", msg_size=8, hidden=15))


def maml_sinusoid_2x10(activation: str = "relu") -> Network:
  """1-20-20-1 relu, L2; stateless agents, M = 8 (used with a learned initialization)."""
  layers = (Dense(20), Activation(activation), Dense(20), Activation(activation), Dense(1), L2())
  return Network(1, layers, LearnedRule("stateless", msg_size=8))


def mnist_20x8(input_size: int = 144, hidden_units: int = 50, activation: str = "sigmoid",
               classes: int = 10) -> Network:
  """144-50-10 sigmoid, softmax, cross-entropy; stateful agents, M = 4, hidden 7, one
  weight network and one bias network shared by both dense layers."""
  layers = (Dense(hidden_units), Activation(activation), Dense(classes), Softmax(), CrossEntropy())
  rule = LearnedRule("stateful", msg_size=4, hidden=7, shared=("weight", "bias"))
  return Network(input_size, layers, rule)


PRESETS: Dict[str, Callable[..., Network]] = {
    "sinusoid_5x10": sinusoid_5x10,
    "maml_sinusoid_2x10": maml_sinusoid_2x10,
    "mnist_20x8": mnist_20x8,
}


def network(name: str, **overrides) -> Network:
  """A preset network by experiment name."""
  if name not in PRESETS:
    raise ValueError(f"unknown experiment {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
