"""megaqkv: Megatron-style 3D-parallel GPT pretraining on DeepSpeed with shared-projection attention."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megaqkv",
    version="0.1.0",
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megaqkv", "megaqkv.*"]),
    package_data={"megaqkv.data": ["gpt2/*"]},
    # Lower bounds only: users bring their own (CUDA) torch build.
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "deepspeed>=0.15",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tiktoken>=0.7",
        "tokenizers>=0.19",
        "tensorboard>=2.14",
        "tqdm>=4.66",
        "zstandard>=0.22",
        "datasets>=2.16",  # local HF datasets directories and parquet (pyarrow) as preprocessing inputs
    ],
    extras_require={
        # megatron-core: an independent reader/writer of the .bin/.idx format for compatibility tests
        # transformers: the HF exports are checked through transformers itself (the native model needs its 5.24
        # cache API); lm-eval + accelerate: the harness adapter, and `lm_eval --model hf` on an export
        # triton: the Triton kernels are tested on CPU through its interpreter (TRITON_INTERPRET=1)
        # matplotlib: the figures of compare_runs.py, ablate.py and analyze.py --plot are drawn and checked
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "megatron-core>=0.12", "transformers>=5.24", "lm-eval>=0.4.2",
                 "accelerate>=0.26", "triton>=3.0", "gigatoken>=0.10", "matplotlib>=3.7"],
        "eval": ["lm-eval>=0.4.2", "transformers>=5.24", "accelerate>=0.26"],
        "flash": ["flash-attn>=2.5"],
        # gigatoken: GPT-2 BPE for preprocessing at several times tiktoken's speed per core (same ids); tiktoken without it
        "fast": ["gigatoken>=0.10"],
        "triton": ["triton>=3.0"],  # megaqkv's attention kernels (CUDA); PyTorch paths without it
        "plot": ["matplotlib>=3.7"],  # PNG figures (compare_runs.py, ablate.py, analyze.py --plot); tables without it
    },
    entry_points={"console_scripts": [
        "megaqkv-analyze=megaqkv.analysis:main",
        "megaqkv-ablate=megaqkv.ablation.ablate:main",
        "megaqkv-compare-runs=megaqkv.ablation.compare:main",
        "megaqkv-preprocess=megaqkv.data.preprocess:main",
        "megaqkv-train-tokenizer=megaqkv.data.train_tokenizer:main",
        "megaqkv-convert=megaqkv.convert:main",
        "megaqkv-evaluate=megaqkv.evaluation.cli:evaluate_main",
        "megaqkv-lm-eval=megaqkv.evaluation.lm_eval_cli:main",  # lm-eval's command line with --model megaqkv
        "megaqkv-generate=megaqkv.evaluation.cli:generate_main",
    ]},
)
