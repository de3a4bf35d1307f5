"""Build script: packages python/posttrain_kernels (+ kernels/ as posttrain_kernels.kernels) and
drives CMakeLists.txt to build the torch-free pybind11 extension posttrain_kernels._C.

Environment switches:
  PTK_SKIP_EXTENSION=1  pure-Python install, no _C (everything falls back to the Python paths)
  PTK_WITH_CUDA=0       never build the CUDA kernels, even where nvcc is found
  PTK_CUDA_ARCHS=...    CUDA architectures, default "80;90"
  PTK_BUILD_TYPE=...    CMake build type, default Release
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _find_nvcc():
    if os.environ.get("PTK_WITH_CUDA", "") == "0":
        return None
    cand = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if not cand:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        path = os.path.join(cuda_home, "bin", "nvcc")
        cand = path if os.path.exists(path) else None
    return cand


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        os.makedirs(out_dir, exist_ok=True)
        build_temp = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_temp, exist_ok=True)
        nvcc = _find_nvcc()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('PTK_BUILD_TYPE', 'Release')}",
            f"-DPTK_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('PTK_CUDA_ARCHS', '80;90')}"]
        gen = ["-G", "Ninja"] if shutil.which("ninja") or _has_ninja_module() else []
        subprocess.check_call(["cmake", HERE, *gen, *args], cwd=build_temp)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp)


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


ext_modules = [] if os.environ.get("PTK_SKIP_EXTENSION", "") == "1" else [CMakeExtension("posttrain_kernels._C")]

setup(
    package_dir={"posttrain_kernels": "python/posttrain_kernels", "posttrain_kernels.kernels": "kernels",
                 "posttrain_kernels.benchmarks": "benchmarks"},
    # every package under python/ (a new subpackage cannot be left out of a wheel), plus the two
    # top-level folders installed inside the package
    packages=find_packages("python") + ["posttrain_kernels.kernels", "posttrain_kernels.benchmarks"],
    # the pipeline's embedded default data (regenerate with python -m posttrain_kernels.pipeline.data)
    package_data={"posttrain_kernels.pipeline": ["data/*.jsonl"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
