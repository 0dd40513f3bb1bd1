"""stmoe: sparse Mixture-of-Experts encoder-decoder models (ST-MoE, Switch, GShard) in JAX/Flax."""

from setuptools import setup

# Version ranges are the ones we test (see README "Tested versions"); pinning ranges keeps installs
# from breaking when an upstream release changes an API (t5x #436, #1086, #1413).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "gin-config>=0.5.0,<0.6",
    "seqio>=0.0.20",
    "sentencepiece>=0.2.0",
    "numpy>=1.26",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "gensim>=4.3",  # ships the real Wikipedia / Rotten Tomatoes test data our bundled tasks use
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",  # the suite runs on 2 workers: compilation is single-threaded
        "torch==2.13.0",
        "transformers==4.57.6",
    ],
    # `stmoe compile --topology v5p:...`: libtpu describes TPU topologies on any host so XLA can compile
    # for them ahead of time (jax[tpu] pins the libtpu that matches the installed jax).
    "tpu": ["jax[tpu]>=0.10.2,<0.12"],
}

setup(
    name="stmoe",
    version="0.1.0",
    description="Sparse Mixture-of-Experts encoder-decoder models (ST-MoE, Switch, GShard) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # `tasks/` (seqio registrations) installs as `stmoe.tasks`, never as a generic top-level `tasks`.
    packages=[
        "stmoe", "stmoe.layers", "stmoe.moe", "stmoe.models", "stmoe.decoding", "stmoe.checkpoints",
        "stmoe.training", "stmoe.evaluation", "stmoe.interop", "stmoe.data", "stmoe.data.corpora", "stmoe.cli",
        "stmoe.tasks", "stmoe.gin",
    ],
    # `gin/` installs as the data folder `stmoe/gin/` so that `--gin_file models/st_moe_tiny.gin` resolves
    # after a regular install too (stmoe.gin_dir()); it has no __init__.py so it never shadows gin-config.
    package_dir={"stmoe": "stmoe", "stmoe.tasks": "tasks", "stmoe.gin": "gin"},
    package_data={"stmoe.gin": ["*.gin", "*/*.gin"], "stmoe.tasks": ["fixtures/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["stmoe = stmoe.cli:main"]},
)
