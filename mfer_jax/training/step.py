"""The jitted train and eval steps.

Both are compiled once per run: batches have static shapes (the eval pipeline pads its last
batch and sends a mask), the state is donated, and nothing leaves the device inside a step.

Frames ([B, ...] batches) and clips ([B, T, ...] batches with ``present``) go through the same
steps: the loss and the metrics are per frame, over the frames ``mask`` selects. Clip
evaluation (`make_window_eval_step`) accumulates each record's logits over the windows that
cover it, so every frame is scored once, from its averaged logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from mfer_jax import sharding
from mfer_jax.models import fusion
from mfer_jax.training import losses
from mfer_jax.training.state import ModelSpec, TrainState

# Batch fields the steps read; ``present`` exists in clip batches only.
BATCH_KEYS = ("face", "mel", "has_face", "label", "mask", "present")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  """The fields of a pipeline batch that the steps read (``present`` only for clips)."""
  return {k: batch[k] for k in BATCH_KEYS if k in batch}


class MeshJit:
  """A jitted function that traces with a mesh's logical-axis rules active.

  Call it like the function, or `lower` it with concrete or abstract
  (``jax.ShapeDtypeStruct``) arguments for ahead-of-time compilation and XLA's cost and memory
  analyses (the planner and the training loop's FLOP count use this).
  """

  def __init__(self, jitted: Any, mesh: Mesh, rules):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules

  def __call__(self, *args):
    with sharding.use_rules(self.mesh, self.rules):
      return self.jitted(*args)

  def lower(self, *args) -> jax.stages.Lowered:
    with sharding.use_rules(self.mesh, self.rules):
      return self.jitted.lower(*args)


def batch_shardings(mesh: Mesh, rules, example_batch: dict[str, Any]) -> dict[str, Any]:
  """Batch-axis sharding for every array of a batch dict."""
  return {k: sharding.batch_sharding(mesh, rules, np.ndim(v)) for k, v in example_batch.items()}


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The EMA decay used for the update after ``step`` optimizer steps.

  ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's ExponentialMovingAverage with
  num_updates): early averages forget the random initialisation quickly, which matters in
  runs of a few hundred steps.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_loss_sum(spec: ModelSpec, cfg: ConfigDict, class_weights: np.ndarray):
  """``loss_sum(params, batch, key) -> (loss sum, (weight sum, correct))`` of one (micro)batch.

  The train step divides the sum by the weight sum (over all microbatches). The loss of a frame
  is the fused head's, plus the unimodal heads' with ``model.fusion.unimodal_loss_weight``
  (`losses.unimodal_loss_sum`) and the gate-entropy penalty with
  ``model.fusion.gate_entropy_weight`` (`losses.gate_entropy_penalty_sum`), weighted by its
  mask and its class's weight; ``key`` drives
  dropout, drop path and modality dropout.
  """
  cw = jnp.asarray(class_weights, jnp.float32)
  loss_fn = losses.make_loss(cfg.train, cfg.model.num_classes)
  unimodal_weight = float(cfg.model.fusion.get("unimodal_loss_weight", 0.0))
  # Only softmax gates that are learned have an entropy to keep up: fixed gates (sum, one
  # modality) would add a constant, and the sigmoid weights do not sum to 1.
  entropy_weight = (float(cfg.model.fusion.get("gate_entropy_weight", 0.0))
                    if cfg.model.fusion.name in fusion.SOFTMAX_LEARNED_GATES else 0.0)

  def loss_sum(params, micro, key):
    model = spec.merge(params)
    out = model(micro["face"], micro["mel"], micro["has_face"], micro.get("present"),
                rngs=nnx.Rngs(dropout=key))
    labels = jnp.maximum(micro["label"], 0)
    weights = micro["mask"].astype(jnp.float32) * cw[labels]
    total = jnp.sum(loss_fn(out["logits"], labels) * weights)
    if "unimodal_logits" in out:
      total += losses.unimodal_loss_sum(loss_fn, out["unimodal_logits"], labels, weights,
                                        out["available"], unimodal_weight)
    if entropy_weight > 0:
      total += losses.gate_entropy_penalty_sum(out["gates"], out["available"], weights,
                                               entropy_weight)
    correct = jnp.sum((out["logits"].argmax(-1) == labels) * micro["mask"])
    return total, (jnp.sum(weights), correct)

  return loss_sum


def make_train_step(spec: ModelSpec, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: ConfigDict, mesh: Mesh,
                    state_sh: TrainState, batch_sh: dict[str, Any],
                    class_weights: np.ndarray) -> MeshJit:
  """Builds ``step(state, batch) -> (state, metrics)``, jitted with explicit shardings.

  Args:
    spec: the model's static half.
    tx: optimizer.
    schedule: learning-rate schedule (for logging).
    cfg: the whole config (uses train.grad_accum_steps, train.loss and its keys,
      train.label_smoothing, model.num_classes, mesh.rules).
    mesh: device mesh.
    state_sh: shardings of the TrainState.
    batch_sh: shardings of the batch dict.
    class_weights: float32 [num_classes] loss weight per class (ones for none).
  """
  ema_decay = float(cfg.train.ema_decay)
  accum = int(cfg.train.grad_accum_steps)
  rules = cfg.mesh.rules
  micro_loss = make_loss_sum(spec, cfg, class_weights)
  value_grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
      (loss_sum, (w_sum, correct)), grads = value_grad_fn(state.params, batch, key)
    else:
      # Microbatch j takes rows j, j+accum, ... so every microbatch stays spread over all
      # data-parallel devices instead of living on a slice of them.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        mb, j = xs
        (l, (w, c)), g = value_grad_fn(state.params, mb, jax.random.fold_in(key, j))
        gsum, lsum, wsum, csum = carry
        return (jax.tree.map(jnp.add, gsum, g), lsum + l, wsum + w, csum + c), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss_sum, w_sum, correct), _ = jax.lax.scan(
          body, (zeros, 0.0, 0.0, 0), (micro, jnp.arange(accum)))
    denom = jnp.maximum(w_sum, 1e-6)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # NaN guard: a non-finite loss or gradient freezes the state and records the step; the
    # loop stops at its next check, and no checkpoint is written after it.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.bad_step < 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    ema = state.ema_params
    if ema is not None:
      d = ema_decay_at(ema_decay, state.step)
      ema = keep(jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params),
                 ema)
    new_state = TrainState(
        step=state.step + ok.astype(jnp.int32),
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=state.rng,
        bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step),
        ema_params=ema)
    n = jnp.sum(batch["mask"])
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "accuracy": correct / jnp.maximum(n, 1), "examples": n}
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=0)
  return MeshJit(jitted, mesh, rules)


def make_eval_step(spec: ModelSpec, cfg: ConfigDict, mesh: Mesh, param_sh: Any,
                   batch_sh: dict[str, Any]) -> MeshJit:
  """Builds ``eval_step(params, acc, batch) -> acc`` that accumulates on device.

  Build it once per run and evaluation (`mfer_jax.training.evaluator.Evaluator` does): each
  build is a new jitted function and traces again. ``eval_step.traces()`` counts the traces.

  ``acc`` holds the confusion matrix [C, C] (rows true, columns predicted) and per-class sums
  of the modality gates [C, 2]; masked (padding) rows add nothing. Accumulating on device
  keeps per-batch host transfers out of evaluation, and the result is already the global sum
  over all hosts.
  """
  num_classes = cfg.model.num_classes
  replicated = NamedSharding(mesh, P())
  traces = [0]

  def eval_step(params, acc, batch):
    traces[0] += 1   # a Python side effect: runs once per trace, never per call
    model = spec.merge(params)
    out = model(batch["face"], batch["mel"], batch["has_face"], batch.get("present"))
    valid = batch["mask"] & (batch["label"] >= 0)
    true = jax.nn.one_hot(jnp.maximum(batch["label"], 0), num_classes) * valid[:, None]
    pred = jax.nn.one_hot(out["logits"].argmax(-1), num_classes)
    return {"confusion": acc["confusion"] + true.T @ pred,
            "gate_sum": acc["gate_sum"] + true.T @ out["gates"]}

  acc_sh = {"confusion": replicated, "gate_sum": replicated}
  jitted = jax.jit(eval_step, in_shardings=(param_sh, acc_sh, batch_sh), out_shardings=acc_sh,
                   donate_argnums=1)
  run = MeshJit(jitted, mesh, cfg.mesh.rules)
  run.traces = lambda: traces[0]   # how often it was traced (tests: once per run)
  return run


def empty_eval_accumulator(num_classes: int, mesh: Mesh) -> dict[str, jax.Array]:
  replicated = NamedSharding(mesh, P())
  return {"confusion": jax.device_put(jnp.zeros((num_classes, num_classes)), replicated),
          "gate_sum": jax.device_put(jnp.zeros((num_classes, 2)), replicated)}


def make_window_eval_step(spec: ModelSpec, cfg: ConfigDict, mesh: Mesh, param_sh: Any,
                          batch_sh: dict[str, Any]) -> MeshJit:
  """Builds ``eval_step(params, acc, batch) -> acc`` for windows of clips.

  ``acc`` (`empty_window_accumulator`) holds, per record of the split, the sum of its logits
  and of its gates over the windows that score it, and how many do; the batch's ``index``
  [B, T] says which record each slot is and ``mask`` which slots are scored. Padded slots and
  windows add nothing. `summarize_windows` turns it into the confusion matrix. Like
  `make_eval_step`, build it once per run (`evaluator.WindowEvaluator` does);
  ``eval_step.traces()`` counts the traces.
  """
  replicated = NamedSharding(mesh, P())
  traces = [0]

  def eval_step(params, acc, batch):
    traces[0] += 1   # a Python side effect: runs once per trace, never per call
    model = spec.merge(params)
    out = model(batch["face"], batch["mel"], batch["has_face"], batch["present"])
    n = acc["count"].shape[0]
    # Unscored slots go to row n, which scatter mode "drop" discards.
    rows = jnp.where(batch["mask"], batch["index"], n).reshape(-1)
    add = lambda a, v: a.at[rows].add(v.reshape(rows.shape[0], *a.shape[1:]), mode="drop")  # noqa: E731
    return {"logit_sum": add(acc["logit_sum"], out["logits"]),
            "gate_sum": add(acc["gate_sum"], out["gates"]),
            "count": add(acc["count"], jnp.ones(batch["mask"].shape, jnp.float32))}

  acc_sh = {"logit_sum": replicated, "gate_sum": replicated, "count": replicated}
  jitted = jax.jit(eval_step, in_shardings=(param_sh, acc_sh, batch_sh), out_shardings=acc_sh,
                   donate_argnums=1)
  run = MeshJit(jitted, mesh, cfg.mesh.rules)
  run.traces = lambda: traces[0]
  return run


def empty_window_accumulator(num_records: int, num_classes: int,
                             mesh: Mesh) -> dict[str, jax.Array]:
  replicated = NamedSharding(mesh, P())
  zeros = lambda *shape: jax.device_put(jnp.zeros(shape, jnp.float32), replicated)  # noqa: E731
  return {"logit_sum": zeros(num_records, num_classes), "gate_sum": zeros(num_records, 2),
          "count": zeros(num_records)}


@jax.jit
def _window_totals(acc, label):
  num_classes = acc["logit_sum"].shape[1]
  scored = acc["count"] > 0
  pred = jax.nn.one_hot(acc["logit_sum"].argmax(-1), num_classes)
  true = jax.nn.one_hot(jnp.maximum(label, 0), num_classes) * (scored & (label >= 0))[:, None]
  gates = acc["gate_sum"] / jnp.maximum(acc["count"], 1.0)[:, None]
  return {"confusion": true.T @ pred, "gate_sum": true.T @ gates}


def summarize_windows(acc: dict[str, jax.Array], label: np.ndarray) -> dict[str, np.ndarray]:
  """Confusion matrix and per-class gate sums of the scored records, one vote per record.

  Each scored record's prediction is the argmax of its summed (so averaged) logits; ``label``
  is the split's per-record label (records labelled -1 are not counted).
  """
  totals = _window_totals(acc, jnp.asarray(label, jnp.int32))
  return jax.device_get(totals)
