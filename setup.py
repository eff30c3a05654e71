"""Builds `m2dino_kernels._C`: the C++ CPU kernels always, the CUDA kernels whenever a CUDA
toolkit and a CUDA build of torch are present (even without a GPU, so CI proves they compile).

The compiled objects are kept in build/ext-<torch, Python, CUDA or not, archs, flags>/ between
installs, and ninja recompiles only the sources that changed since: a second `pip install
--no-build-isolation -e .` (setuptools otherwise compiles an editable install in a fresh
temporary folder each time) only links. The build prints what it compiles and how to skip
CUDA (`pip install -v` shows it).

Environment:
  M2DINO_BUILD_EXT=0     build no extension at all (the package then runs on its torch backend)
  M2DINO_BUILD_CUDA=0    skip the CUDA sources; =1 insists on them (fails if no toolkit)
  TORCH_CUDA_ARCH_LIST   CUDA archs, default "8.0;9.0+PTX" (A100 and H100/H200 cubins, and
                         PTX of the newest so that later GPUs JIT-compile it)
  CUDA_HOME              the toolkit root; found automatically otherwise
"""
import glob
import hashlib
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
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        sources += cuda_sources
        define_macros.append(("M2DINO_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-std=c++20", "--threads", "2", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
        say(f"building the C++ CPU kernels and the CUDA kernels ({len(cuda_sources)} .cu files for archs "
            f"{os.environ['TORCH_CUDA_ARCH_LIST']}, CUDA_HOME={cuda_home}); a first CUDA build takes several "
            f"minutes, also on a machine without a GPU. M2DINO_BUILD_CUDA=0 skips the CUDA kernels.")
    else:
        ext_cls = cpp_extension.CppExtension
        why = ("M2DINO_BUILD_CUDA=0" if want_cuda == "0" else "no CUDA toolkit found" if not cuda_home
               else "torch is a CPU-only build")
        say(f"building the C++ CPU kernels only ({why})")
    say("compiling: " + ", ".join(os.path.basename(f) for f in sources))
    ext = ext_cls(
        name="m2dino_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    # what the objects depend on besides the sources (ninja tracks those): another torch, Python,
    # toolkit, arch list or flag set gets a folder of its own
    key = repr((torch.__version__, torch.version.cuda, sys.version_info[:2], build_cuda, cuda_home,
                os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None, extra, define_macros))
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    kind = "cuda" if build_cuda else "cpu"
    build_temp = os.path.join(here, "build", f"ext-torch{torch.__version__.split('+')[0]}-{kind}-{digest}")
    return [ext], {"build_ext": kept_build_temp(cpp_extension.BuildExtension.with_options(use_ninja=True), build_temp)}


def say(message: str) -> None:
    print(f"m2dino: {message}", flush=True)


def kept_build_temp(build_ext, build_temp: str):
    """build_ext compiling into `build_temp`, which stays between builds (see the module doc)."""
    class KeptBuildTemp(build_ext):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = build_temp

        def run(self):
            state = "kept from the last build" if os.path.isfile(os.path.join(build_temp, "build.ninja")) else "new"
            say(f"objects in {build_temp} ({state}; ninja compiles only what changed since)")
            super().run()

    return KeptBuildTemp


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
