"""binarydm_jax: BinaryDM weight binarization for diffusion models in JAX/Flax."""

import os

# TensorFlow (tfds data, clu's TensorBoard writer; see `lazy_imports`) logs its C++ start-up
# (oneDNN, CPU features, "All log messages before absl::InitializeLog()") unless this is set
# before it is imported; only warnings and errors of its own are lost. An explicit value wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
