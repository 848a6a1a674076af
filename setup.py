"""guppy: a tiny fish-persona language model, and the hand-written kernels that train it fast.

The design card puts `guppy/`, `kernels/` and `csrc/` side by side at the repository root. They install under one
import namespace (`guppy.kernels`, `guppy.csrc`) so that nothing shadows Hugging Face's top-level `kernels` package.
torch is a dependency with no upper pin, so `pip install` on Colab keeps the torch that is already there.
"""
from setuptools import setup

setup(
    name="guppy",
    version="0.1.0",
    description=("A ~9M-parameter fish-persona transformer trained from scratch in minutes, "
                 "with Triton and CUDA kernels"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tomllib (the persona files)
    packages=["guppy", "guppy.personas", "guppy.web", "guppy.kernels", "guppy.csrc"],
    package_dir={"guppy.kernels": "kernels", "guppy.csrc": "csrc"},
    package_data={
        "guppy.personas": ["*.toml"],
        "guppy.web": ["*.html", "*.js"],
        "guppy.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh"],
    },
    install_requires=[
        "torch>=2.1",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "ninja",
    ],
    extras_require={
        # numpy<2.4: Triton < 3.7's interpreter (3.6 is Colab's) fails under NumPy >= 2.4; fixed in Triton 3.7.0
        "test": ["pytest", "pytest-benchmark", "triton", "matplotlib", "onnx", "onnxscript", "onnxruntime",
                 "numpy<2.4", "transformers>=4.45,<6", "pytest-xdist"],
        # guppy export and the ONNX chat (torch.onnx's exporter needs onnxscript)
        "export": ["onnx", "onnxscript", "onnxruntime"],
        # guppy export --format hf (a transformers GPT-2 folder); tests/test_hf.py passes on 4.45.2, 4.57.6, 5.24.0
        "hf": ["transformers>=4.45,<6"],
        "bench": ["pytest-benchmark", "triton", "matplotlib", "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={"console_scripts": ["guppy=guppy.cli:main"]},
)
