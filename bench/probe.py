r"""Reference points for a dataset: a linear probe, chance and the majority class.

  python -m bench.probe                                   # the demo split (configs/demo.py)
  python -m bench.probe --config=configs/abaw.py --config.data.data_dir=/data/affwild2_prepared

What a deep model must beat to be worth its cost, computed on the same train / validation
records the model sees (no augmentation):

- **probe**: scikit-learn multinomial logistic regression on hand-made features of one frame:
  the face crop as 24x24 grey pixels (each image standardised) and the log-mel window's mean
  over time per mel band (64 values), plus a has-face flag; features are standardised with
  the train split's statistics; classes are weighted inversely to their train frequency,
  which is what macro-F1 rewards (as dynamic resampling does for the deep model). It is fit
  for each inverse L2 strength C of ``--c_values`` and the best on validation is reported as "best probe":
  choosing C on the evaluation split flatters the probe, which makes it a conservative bar.
- **chance**: guessing each label at random with the train split's class frequencies. Its
  expected per-class F1 is 2 p_c q_c / (p_c + q_c) (p: guess rate, q: the split's own class
  frequency), computed exactly rather than by simulation.
- **majority**: always answering the train split's commonest class.
- **code oracle** (synthetic sets only): a reader of each segment's drawn face and voice codes
  (`data_prep.synth.code_oracle`): roughly the ceiling of the set, given its noise segments
  (a random face or voice code, silence), which no model can read past.

Everything is deterministic (lbfgs, no sampling), so the numbers reproduce exactly. The
configuration's synthetic set is made first if it is missing, as `main.py` would.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
from absl import flags
from ml_collections import config_flags
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from data_prep import api as data_prep_api
from data_prep import synth
from mfer_jax import cli, constants
from mfer_jax.data import reader as reader_lib
from mfer_jax.data import store

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config whose data to "
                                          "probe (its data.data_dir and eval split).")
_FACE = flags.DEFINE_integer("face_pixels", 24, "Side of the grey face thumbnail.")
_C = flags.DEFINE_list("c_values", ["0.001", "0.01", "0.1", "1"],
                       "Inverse L2 strengths of the logistic regression to try.")
_MAX_ITER = flags.DEFINE_integer("max_iter", 2000, "lbfgs iterations.")

NUM_CLASSES = constants.NUM_CLASSES


def frame_features(face: np.ndarray, has_face: bool, mel: np.ndarray, face_pixels: int) -> np.ndarray:
  """[face_pixels**2 grey pixels (standardised per image), n_mels band means, has_face]."""
  if has_face:
    grey = cv2.resize(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY), (face_pixels, face_pixels),
                      interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    grey = (grey - grey.mean()) / (grey.std() + 1e-6)
  else:
    grey = np.zeros(face_pixels * face_pixels, np.float32)
  bands = mel.astype(np.float32).mean(axis=1) / 255.0
  return np.concatenate([grey, bands, [float(has_face)]]).astype(np.float32)


def split_features(data_dir: str, split: str, face_pixels: int) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every labelled record of a split, in record order."""
  index = store.load_split(data_dir, split)
  reader = reader_lib.SplitReader(index)
  ids = np.flatnonzero(np.asarray(index.label) >= 0)
  feats = []
  for i in ids:
    ex = reader[int(i)]
    feats.append(frame_features(ex["face"], bool(ex["has_face"]), ex["mel"], face_pixels))
  return np.stack(feats), np.asarray(index.label)[ids].astype(np.int64)


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
  """ABAW macro-F1: the mean over all 8 classes (absent classes count as 0)."""
  return float(f1_score(labels, preds, labels=range(NUM_CLASSES), average="macro",
                        zero_division=0))


def chance_f1(train_labels: np.ndarray, labels: np.ndarray) -> float:
  """Expected macro-F1 of guessing with the train class frequencies, on ``labels``."""
  p = np.bincount(train_labels, minlength=NUM_CLASSES) / len(train_labels)
  q = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
  return float(np.mean(np.where(p + q > 0, 2 * p * q / np.maximum(p + q, 1e-12), 0.0)))


def main() -> None:
  config = _CONFIG.value
  data_prep_api.prepare_for_config(config)
  data_dir = config.data.data_dir
  eval_split = config.evals[config.train.primary_eval].split
  t0 = time.monotonic()
  x_train, y_train = split_features(data_dir, "train", _FACE.value)
  x_eval, y_eval = split_features(data_dir, eval_split, _FACE.value)
  t_feat = time.monotonic() - t0
  scaler = StandardScaler().fit(x_train)
  x_train, x_eval = scaler.transform(x_train), scaler.transform(x_eval)
  rows = []
  # One BLAS thread: lbfgs on a matrix this small is 3-4x slower when threads contend.
  with threadpool_limits(1):
    for c in _C.value:
      probe = LogisticRegression(C=float(c), max_iter=_MAX_ITER.value, class_weight="balanced")
      probe.fit(x_train, y_train)
      rows.append((f"probe C={c}", macro_f1(y_train, probe.predict(x_train)),
                   macro_f1(y_eval, probe.predict(x_eval))))
  best = max(rows, key=lambda r: r[2])
  majority = int(np.bincount(y_train, minlength=NUM_CLASSES).argmax())
  rows += [
      (f"best probe ({best[0][6:]})", best[1], best[2]),
      ("chance (class frequencies)", chance_f1(y_train, y_train), chance_f1(y_train, y_eval)),
      (f"majority ({constants.CLASS_NAMES[majority]})",
       macro_f1(y_train, np.full_like(y_train, majority)),
       macro_f1(y_eval, np.full_like(y_eval, majority))),
  ]
  syn = config.get("synthetic")
  if syn and syn.enabled:
    plans = synth.plan_dataset(syn.num_videos, syn.seed, tuple(syn.seconds))
    rows.append(("code oracle (synthetic set)",
                 *(macro_f1(*synth.code_oracle(plans, s)) for s in ("train", eval_split))))
  print(f"{data_dir}: train {len(y_train)} frames, {eval_split} {len(y_eval)} frames; "
        f"features {x_train.shape[1]} ({_FACE.value}x{_FACE.value} grey face, "
        f"{x_train.shape[1] - _FACE.value ** 2 - 1} mel band means, has_face); "
        f"{t_feat:.0f} s to read, {time.monotonic() - t0 - t_feat:.0f} s to fit")
  print(f"{'macro-F1':<30} {'train':>7} {eval_split:>10}")
  for name, f_train, f_eval in rows:
    print(f"{name:<30} {f_train:>7.4f} {f_eval:>10.4f}")


if __name__ == "__main__":
  cli.run(main)
