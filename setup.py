"""Builds `m2dino_kernels._C`: the C++ CPU kernels always, the CUDA kernels whenever a CUDA
toolkit and a CUDA build of torch are present (even without a GPU, so CI proves they compile).

Environment:
  M2DINO_BUILD_EXT=0     build no extension at all (the package then runs on its torch backend)
  M2DINO_BUILD_CUDA=0    skip the CUDA sources; =1 insists on them (fails if no toolkit)
  TORCH_CUDA_ARCH_LIST   CUDA archs, default "8.0;9.0+PTX" (A100 and H100/H200 cubins, and
                         PTX of the newest so that later GPUs JIT-compile it)
  CUDA_HOME              the toolkit root; found automatically otherwise
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and bool(
        glob.glob(os.path.join(path, "lib64", "libcudart.so*"))
        + glob.glob(os.path.join(path, "targets", "*", "lib", "libcudart.so*"))
    )


def find_cuda_home():
    """The real toolkit root. torch guesses it from the folder of `nvcc` on PATH, which is
    wrong when that `nvcc` is a wrapper script (then `-lcudart` is not found at link time)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script names the real nvcc on its exec line
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for token in head.split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    return next((c for c in candidates if _is_toolkit_root(c)), None)


def extensions():
    if os.environ.get("M2DINO_BUILD_EXT", "1") == "0":
        return [], {}
    want_cuda = os.environ.get("M2DINO_BUILD_CUDA", "auto")
    cuda_home = find_cuda_home() if want_cuda != "0" else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    import torch
    from torch.utils import cpp_extension

    build_cuda = bool(cuda_home) and torch.version.cuda is not None
    if want_cuda == "1" and not build_cuda:
        sys.exit("M2DINO_BUILD_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20"]  # torch >= 2.10 headers need C++20
    define_macros = []
    extra = {"cxx": cxx_flags}
    if build_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        define_macros.append(("M2DINO_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-std=c++20", "--threads", "2", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
        print(f"m2dino: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
              f"archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext_cls = cpp_extension.CppExtension
        print("m2dino: building CPU kernels only (no CUDA toolkit or CPU-only torch)")
    ext = ext_cls(
        name="m2dino_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
