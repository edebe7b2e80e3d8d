"""The networks and rules of the three published experiments.

Each preset returns a `Network` (inner architecture + rule); the task and outer-loop
settings live with the meta-training configs (`mplp/host/configs/*.toml`). The hidden widths
and the activation may be changed (e.g. a step activation, or a bigger network for a
transfer experiment); the defaults are the published ones.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

from mplp.layers import Activation, Dense, Softmax
from mplp.learned import LearnedRule
from mplp.losses import CrossEntropy, L2
from mplp.network import Network


def _mlp(hidden: Sequence[int], outputs: int, activation: str):
  layers = []
  for width in hidden:
    layers += [Dense(int(width)), Activation(activation)]
  return layers + [Dense(outputs)]


def sinusoid_5x10(activation: str = "relu", hidden: Sequence[int] = (20, 20),
                  input_size: int = 1, outputs: int = 1) -> Network:
  """1-20-20-1 relu, L2; stateful agents, M = 8, state_size 15, per-layer networks."""
  layers = (*_mlp(hidden, outputs, activation), L2())
  return Network(input_size, layers, LearnedRule("stateful", msg_size=8, state_size=15))


def maml_sinusoid_2x10(activation: str = "relu", hidden: Sequence[int] = (20, 20),
                       input_size: int = 1, outputs: int = 1) -> Network:
  """1-20-20-1 relu, L2; stateless agents, M = 8 (used with a learned initialization)."""
  layers = (*_mlp(hidden, outputs, activation), L2())
  return Network(input_size, layers, LearnedRule("stateless", msg_size=8))


def mnist_20x8(activation: str = "sigmoid", hidden: Sequence[int] = (50,),
               input_size: int = 144, outputs: int = 10) -> Network:
  """144-50-10 sigmoid, softmax, cross-entropy; stateful agents, M = 4, state_size 7, one
  weight network and one bias network shared by all dense layers."""
  layers = (*_mlp(hidden, outputs, activation), Softmax(), CrossEntropy())
  rule = LearnedRule("stateful", msg_size=4, state_size=7, shared=("weight", "bias"))
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
