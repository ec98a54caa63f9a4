"""Names and defaults shared by every part of mfer-jax: the one place each is written.

This module imports nothing, so configs, data preparation, the model and the tools can all
use it without pulling in JAX or each other.
"""

# The ABAW Expression classes, in label-index order (Aff-Wild2 annotation header order).
CLASS_NAMES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise",
               "Other")
NUM_CLASSES = len(CLASS_NAMES)
# The first line of every Aff-Wild2 annotation file and of every ABAW prediction file.
ANNOTATION_HEADER = ",".join(CLASS_NAMES)
# Aff-Wild2's valid EXPR frames per class, in thousands (docs/data.md#aff-wild2-in-numbers):
# the imbalance the synthetic generators reproduce.
AFFWILD2_CLASS_FRAMES_K = (262.6, 23.3, 16.3, 17.6, 129.3, 106.3, 43.0, 278.1)
# Divided by the exact total 876.5 (a float sum() gives 876.5000000000001 and would shift the
# synthetic labels drawn from these probabilities).
AFFWILD2_CLASS_PROBS = tuple(n / 876.5 for n in AFFWILD2_CLASS_FRAMES_K)

SPLITS = ("train", "validation", "test")

# Where training reads records from (mfer_jax.data.sources): data_prep.build's prepared
# directory, or a TFDS-built dataset (data_prep/tfds_affwild2.py, registered under TFDS_NAME).
DATA_SOURCES = ("prepared", "tfds")
TFDS_NAME = "aff_wild2_expr"

# Side of Aff-Wild2's cropped_aligned face crops, and of the crops data_prep writes.
FACE_SIZE = 112

# Fusion variants (mfer_jax.models.fusion), in ablation-table order.
FUSION_VARIANTS = ("visual_only", "audio_only", "concat", "sum", "gated", "mfm",
                   "mfm_sigmoid_concat")
SINGLE_MODALITY_FUSIONS = ("visual_only", "audio_only")
# Variants whose reported modality gates are fixed by construction rather than learned:
# the single-modality ones (1 for their modality), sum (equal weights it really applies) and
# concat (no mixing weights; it reports the same availability split as sum).
FIXED_GATE_FUSIONS = ("visual_only", "audio_only", "concat", "sum")

# Train-set sampling modes (mfer_jax.data.sampling): weighted resampling, or each frame once.
SAMPLING_MODES = ("dynamic", "natural")

# Temporal heads over a clip's frames (mfer_jax.models.temporal), in ablation-table order.
TEMPORAL_HEADS = ("none", "transformer", "tcn")

# Compute dtypes a config may name.
DTYPES = ("float32", "bfloat16")
# How matmuls are computed (model.precision.matmul; mfer_jax.models.layers).
MATMUL_PATHS = ("xla", "cpu_amx", "auto")
# Rematerialisation policies per transformer block (model.remat; mfer_jax.models.layers).
REMAT_POLICIES = ("none", "block", "dots_saveable")
