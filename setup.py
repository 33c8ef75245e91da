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

    import importlib.util  # load _extension.py by path: importing the package would import all of it
    _spec = importlib.util.spec_from_file_location("_rils_ext", os.path.join("rils_scale", "ops", "_extension.py"))
    _ext = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_ext)
    stamp_defines = _ext.stamp_defines  # source hash + archs, checked when the module is loaded
    _archs = os.environ.get("RILS_CUDA_ARCHS", "80;90")
    ext_modules = [CUDAExtension(
        define_macros=stamp_defines(_archs.split(";")),
        name="rils_scale_kernels",
        sources=["kernels/patch_sentence_kl.cpp", "kernels/patch_sentence_kl_kernel.cu"],
        # C++20: torch >= 2.10 headers require it. Archs: "80;90" unless RILS_CUDA_ARCHS says otherwise.
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-std=c++20"] + [
                                f for arch in _archs.split(";")
                                for f in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]},
    )]
    cmdclass = {"build_ext": BuildExtension}

INTEROP = ["open_clip_torch>=3.0,<4", "transformers>=4.40", "tokenizers>=0.19", "clip_benchmark>=1.6", "ftfy",
           "protobuf", "requests"]  # clip_benchmark imports requests without declaring it

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
        # OpenCLIP / CLIP_benchmark / transformers interop (exports and their tests); the trainer never imports them
        "interop": INTEROP,
        "dev": ["pytest>=8", "pyarrow"] + INTEROP,  # pyarrow: the parquet listing tests
        "parquet": ["pyarrow"],  # make_shards.py --input listing.parquet (img2dataset's input format)
        "gpu": ["ninja"],  # flash-attn and NVIDIA apex are optional: install them by hand
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
