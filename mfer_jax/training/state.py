"""The train state, created already sharded on the mesh.

Order (big_vision / maxtext habit): build the model abstractly (no memory), derive every
leaf's sharding from the logical-axis rules, then run the initialiser under ``jax.jit`` with
those out_shardings, so each device only ever materialises its own shard.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from mfer_jax import sharding
from mfer_jax.models.layers import Precision
from mfer_jax.models.model import ExpressionModel


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  Attributes:
    step: optimizer steps taken (int32 scalar).
    params: model parameters (nnx.State of Params).
    opt_state: optimizer state.
    rng: base PRNG key; step ``s`` uses ``fold_in(rng, s)``, so randomness is a function of
      (seed, step) and a resumed run draws exactly what an uninterrupted one would.
    bad_step: -1, or the first step whose loss or gradient was not finite (the NaN guard
      freezes the state from then on and the loop stops with a message naming it).
    ema_params: exponential moving average of ``params`` when ``train.ema_decay`` > 0 (see
      `mfer_jax.training.step.ema_decay_at`), else None. Evaluation, the best checkpoint and
      prediction use it (`eval_params`).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  bad_step: jax.Array
  ema_params: Any = None


def uses_ema(train_cfg: ConfigDict) -> bool:
  """Whether ``config.train`` keeps an EMA of the params (so the state has ``ema_params``)."""
  return float(train_cfg.ema_decay) > 0


def eval_params(state: TrainState) -> Any:
  """The parameters to evaluate and predict with: the EMA when there is one."""
  return state.params if state.ema_params is None else state.ema_params


class ModelSpec:
  """The static half of the model (graph definition) plus its non-param variables.

  ``merge(params)`` rebuilds a callable model inside jit. ``from_features``: the model of a
  feature-cache run (``data.features_dir``), fusion and head only.
  """

  def __init__(self, model_cfg: ConfigDict, precision: Precision | None = None,
               from_features: bool = False):
    """Args: the model config, optionally a resolved precision overriding its own, and
    whether the model reads cached features (no encoders)."""
    self.from_features = bool(from_features)
    abstract = nnx.eval_shape(lambda: ExpressionModel(model_cfg, rngs=nnx.Rngs(0),
                                                      precision=precision,
                                                      from_features=self.from_features))
    self.model_cfg = model_cfg
    self.precision: Precision = abstract.precision
    self.graphdef, self.abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(abstract_rest):
      raise ValueError("the model has non-Param variables; they must be part of TrainState")
    self.rest = abstract_rest

  def merge(self, params) -> ExpressionModel:
    return nnx.merge(self.graphdef, params, self.rest)


def _init_params(spec: ModelSpec, key: jax.Array):
  model = ExpressionModel(spec.model_cfg, rngs=nnx.Rngs(params=key), precision=spec.precision,
                          from_features=spec.from_features)
  return nnx.state(model, nnx.Param)


def state_shardings(spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh,
                    rules, ema: bool = False) -> TrainState:
  """NamedShardings for every TrainState leaf: params (and their EMA when ``ema``) by rules,
  optimizer moments like their params, and scalars (step, counts, keys) replicated."""
  replicated = NamedSharding(mesh, P())
  param_sh = sharding.state_shardings(spec.abstract_params, mesh, rules)
  opt_abstract = jax.eval_shape(tx.init, spec.abstract_params)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, opt_abstract, param_sh,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  # Moments are stored as raw arrays or as Variables, depending on the optax transform.
  opt_sh = jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else replicated, opt_sh,
                        is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                    bad_step=replicated, ema_params=param_sh if ema else None)


def create_train_state(config: ConfigDict, spec: ModelSpec, tx: optax.GradientTransformation,
                       mesh: Mesh) -> tuple[TrainState, TrainState]:
  """Initialises params and optimizer directly into their shards.

  Returns:
    (state, shardings): the sharded state and the matching tree of NamedShardings, which the
    step and the checkpoint restore reuse.
  """
  ema = uses_ema(config.train)
  shardings = state_shardings(spec, tx, mesh, config.mesh.rules, ema=ema)
  sharding.check_replication(spec.abstract_params, shardings.params, mesh,
                             config.mesh.max_replicated_fraction)
  seed_key = jax.random.key(config.seed)
  param_key, rng = jax.random.split(seed_key)

  def init(param_key, rng):
    params = _init_params(spec, param_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng, bad_step=jnp.full((), -1, jnp.int32),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None)

  with sharding.use_rules(mesh, config.mesh.rules):
    state = jax.jit(init, out_shardings=shardings)(param_key, rng)
  return state, shardings


def abstract_state(shardings: TrainState, spec: ModelSpec,
                   tx: optax.GradientTransformation) -> TrainState:
  """ShapeDtypeStructs with shardings: the restore target for Orbax."""
  shapes = jax.eval_shape(lambda: TrainState(
      step=jnp.zeros((), jnp.int32), params=spec.abstract_params,
      opt_state=tx.init(spec.abstract_params), rng=jax.random.key(0),
      bad_step=jnp.zeros((), jnp.int32),
      ema_params=None if shardings.ema_params is None else spec.abstract_params))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
