"""teacherlm_jax: TeacherLM (He et al., 2023) on JAX/Flax, TPU-native."""
import setuptools

# The JAX release this project is tested with; the accelerator extras pin their jaxlib/libtpu
# builds to it so that a TPU VM runs what CI compiled.
JAX_VERSION = "0.10.2"

setuptools.setup(
    name="teacherlm_jax",
    version="0.1.0",
    description="TeacherLM data augmentation (fundamentals, chain of thought, common mistakes) in JAX/Flax.",
    packages=setuptools.find_packages(include=["teacherlm_jax", "teacherlm_jax.*"]),
    package_data={"teacherlm_jax": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "seqio==0.0.20",
        "tensorflow>=2.16",
        "tensorflow-datasets",
        "sentencepiece",
        "absl-py",
        "gin-config",
        "numpy",
        "pyarrow",
        "clu",
        "matplotlib",
        "etils[epath]",
        "gcsfs",  # gs:// for storage/files.py (and orbax metadata, with EPATH_USE_TF off)
    ],
    extras_require={
        # torch is pinned by .ci/run (pip install torch==2.13.0) before this extra so that the
        # CPU build is used; the range here admits it without pulling anything newer.
        "hf": ["transformers>=4.40", "safetensors", "torch>=2.1"],
        # gcp-storage-emulator: a local GCS API server the gs:// tests start; scipy: the
        # sampling test's chi-square tests.
        "test": ["pytest", "pytest-timeout", "gcp-storage-emulator", "scipy"],
        # libtpu: TPU VMs run on it, and CPU hosts compile for TPU topologies with it.
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "cuda": [f"jax[cuda12]=={JAX_VERSION}"],
    },
)
