"""Builds the taskvec Python package with CMake (the pybind11 extension python/src/module.cpp over the
engine's static libraries) for `pip install --no-build-isolation .`: no download, Debian's packages only
(cmake, ninja-build, pybind11-dev, python3-dev and the engine's -dev packages). docs/PYTHON.md."""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def version():
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        return re.search(r"project\(taskvec VERSION ([0-9.]+)", f.read()).group(1)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        subprocess.check_call(["cmake", "-S", ROOT, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                               "-DTASKVEC_BUILD_CLI=OFF", "-DTASKVEC_BUILD_TESTS=OFF", "-DTASKVEC_BUILD_BENCHMARKS=OFF",
                               "-DTASKVEC_BUILD_LAB=OFF", "-DTASKVEC_INSTALL=OFF", "-DTASKVEC_BUILD_PYTHON=ON",
                               f"-DPython3_EXECUTABLE={sys.executable}"])
        subprocess.check_call(["cmake", "--build", build, "--target", "taskvec_python"])
        built = glob.glob(os.path.join(build, "python", "taskvec", "_taskvec*.so"))
        if not built:
            raise RuntimeError("the CMake build made no _taskvec extension (is pybind11-dev installed?)")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(built[0], target)


setup(
    name="taskvec",
    version=version(),
    description="Task arithmetic and model merging on safetensors, PyTorch and PEFT checkpoints",
    packages=["taskvec"],
    package_dir={"": "python"},
    ext_modules=[Extension("taskvec._taskvec", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["numpy"],
    zip_safe=False,
)
