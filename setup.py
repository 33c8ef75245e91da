"""rils_scale: RILS image-text pre-training with DeepSpeed ZeRO-3 and tensor parallelism.

The fused CUDA extension (kernels/) is built only when asked:
    RILS_BUILD_CUDA_EXT=1 CUDA_HOME=/usr/local/cuda pip install -e .
otherwise it is JIT-compiled on first GPU use (see docs/kernels.md).
"""
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("RILS_BUILD_CUDA_EXT", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [CUDAExtension(
        name="rils_scale_kernels",
        sources=["kernels/patch_sentence_kl.cpp", "kernels/patch_sentence_kl_kernel.cu"],
        # C++20: torch >= 2.10 headers require it. Archs: "80;90" unless RILS_CUDA_ARCHS says otherwise.
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-std=c++20"] + [
                                f for arch in os.environ.get("RILS_CUDA_ARCHS", "80;90").split(";")
                                for f in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]},
    )]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="rils_scale",
    version="0.1.0",
    description="RILS (masked visual reconstruction in language semantic space) pre-training at scale",
    packages=find_packages(include=["rils_scale", "rils_scale.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.16",
        "deepspeed>=0.16,<0.20",
        "webdataset>=0.2.86",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "timm>=1.0",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "scikit-learn",
    ],
    extras_require={
        "dev": ["pytest>=8"],
        "parquet": ["pyarrow"],  # make_shards.py --input listing.parquet (img2dataset's input format)
        "gpu": ["ninja"],  # flash-attn and NVIDIA apex are optional: install them by hand
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
