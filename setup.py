"""Build and install longtrain.

Maps the top-level folders trainer/, kernels/, launch/ and recipes/ to longtrain.trainer,
longtrain.kernels, longtrain.launch and longtrain.recipes (the bare names are taken on PyPI),
and builds csrc/ into the torch extension longtrain.kernels._C: C++ always, CUDA when torch
has CUDA and CUDA_HOME is set. A failed or skipped extension build still leaves a working
package: dispatch then uses the torch and reference backends.
"""
import glob
import os

from setuptools import find_packages, setup

PACKAGES = {"trainer": "longtrain.trainer", "kernels": "longtrain.kernels", "launch": "longtrain.launch"}


def packages():
    found, dirs = [], {}
    for folder, name in PACKAGES.items():
        for sub in [""] + find_packages(folder):
            pkg = f"{name}.{sub}" if sub else name
            found.append(pkg)
            dirs[pkg] = os.path.join(folder, *sub.split(".")) if sub else folder
    found.append("longtrain.recipes")
    dirs["longtrain.recipes"] = "recipes"
    return found, dirs


def extensions():
    """The csrc extension, or nothing when it is disabled or torch is missing at build time."""
    if os.environ.get("LONGTRAIN_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return [], {}
    # -fno-trapping-math (as torch itself builds): without it GCC will not if-convert the float clamps in
    # exp_approx, and the AVX2 clones of every loop calling it stay scalar (AVX-512 masks hide this).
    cxx = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    use_cuda = bool(torch.version.cuda) and bool(os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME) and cuda_sources
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "longtrain.kernels._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DLONGTRAIN_WITH_CUDA"], "nvcc": ["-O3", "--use_fast_math", "-std=c++17", "-DLONGTRAIN_WITH_CUDA"]},
            extra_link_args=["-fopenmp"], optional=True)
    else:
        ext = cpp_extension.CppExtension(
            "longtrain.kernels._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"], optional=True)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


pkgs, dirs = packages()
ext_modules, cmdclass = extensions()

setup(
    name="longtrain",
    version="0.1.0",
    description="Distributed training of long-context hybrid attention / Mamba / Neural-ODE language models",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=pkgs,
    package_dir=dirs,
    package_data={"longtrain.recipes": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "megatron-core>=0.16,<0.20",
        "ray[default,train]>=2.40",
        "sentencepiece>=0.2",
        "torchdiffeq>=0.2.4",
        "pydantic>=2.5",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "rich>=13",
        "numpy",
        "safetensors>=0.4",
        "pyarrow>=14",  # parquet and Arrow corpora, read as streams (trainer/data/columnar.py)
        "matplotlib>=3.7",
    ],
    extras_require={
        # transformers: the peer in tests that compare against it (the bench peer rows), never a training dependency
        "test": ["pytest>=7", "pytest-timeout", "transformers>=4.40"],
        "gpu": ["flash-attn", "mamba-ssm"],
        "bench": ["transformers>=4.40"],  # the peers of bench/train_throughput.py (Llama, Mamba), random init
    },
    entry_points={"console_scripts": ["longtrain = longtrain.launch.cli:main"]},
)
