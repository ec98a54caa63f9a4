"""mfer-jax: audio-visual facial expression recognition (ABAW / Aff-Wild2) in JAX and Flax NNX."""

from flax import nnx as _nnx

# Params carry logical axis names, and the trainer places them with jit out_shardings built
# from the config's rules (mfer_jax.sharding). Flax's eager sharding would instead try to place
# each variable at construction time and fails without a mesh context (e.g. on a laptop).
_nnx.use_eager_sharding(False)
