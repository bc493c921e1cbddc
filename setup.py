"""hm3_jax: Hierarchical Multi-objective Model Merging (HM3) in JAX."""

import setuptools

setuptools.setup(
    name="hm3_jax",
    version="0.1.0",
    description="Multi-objective parameter- and architecture-space model merging in JAX (HM3, NeurIPS 2025).",
    packages=setuptools.find_packages(include=["hm3_jax", "hm3_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax",
        "orbax-checkpoint",
        "evosax>=0.3,<0.4",
        "chex",
        "absl-py",
        "ml-collections",
        "transformers>=4.57,<5",
        "safetensors",
        "tokenizers",
        "numpy",
        "ml_dtypes",
        "matplotlib",
        "tqdm",
        "sacrebleu",
        "pyyaml",
        "filelock",
        "threadpoolctl",  # host numpy BLAS on one thread (hm3_jax/host_blas.py)
        "tensorboardX",
        # tiny8's offline image data (hm3_jax/tasks/tiny8/images.py): sklearn's bundled digits, scikit-image's
        # sample photographs, scipy for resizing, PIL + matplotlib's bundled DejaVu fonts for the letters.
        "scikit-learn",
        "scikit-image",
        "scipy",
        "pillow",
        # exact hypervolume (hm3_jax/moo/hypervolume.py): C, 11-66x our own on 8-objective fronts of 15-60 points
        "moocore>=0.3,<0.4",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "nbclient",
            "nbformat",
            "ipykernel",
            "ruff",
            "filelock",
            # tests/test_lm_eval.py; 0.4.13's core needs no torch (its `hf` backend does: then pin torch==2.13.0,
            # the CPU wheel on the build machines, as an unpinned torch is a multi-GB CUDA build)
            "lm-eval>=0.4.13,<0.4.14",
        ],
        "lm_eval": ["lm-eval>=0.4.13,<0.4.14"],  # hm3_jax.evaluation.lm_eval_model, experiments.harness_eval
    },
)
