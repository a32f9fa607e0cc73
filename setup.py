"""Builds the native DICOM reader cxrfast._dicom (C++17, pybind11, zlib; no torch)."""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
extra_compile_args = ["-O3", "-fno-strict-aliasing"]
extra_link_args = []
if os.environ.get("CXRFAST_SANITIZE"):
    # An ASan/UBSan build for fuzzing: CXRFAST_SANITIZE=1 pip install -e .
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
    extra_compile_args = flags
    extra_link_args = flags

ext = Pybind11Extension(
    "cxrfast._dicom",
    sources,
    include_dirs=["csrc/include"],
    libraries=["z"],
    cxx_std=17,
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
