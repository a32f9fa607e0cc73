"""Builds the native DICOM reader cxrfast._dicom (C++17, pybind11, zlib; no torch)."""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
extra_compile_args = ["-O3", "-fno-strict-aliasing"]
extra_link_args = []
if os.environ.get("CXRFAST_SANITIZE"):
    # An ASan/UBSan build for fuzzing: CXRFAST_SANITIZE=1 python setup.py build_ext --inplace.
    # float-cast-overflow is not part of "undefined": it catches float-to-int casts of header
    # values out of range (NaN, 1e300).
    flags = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-omit-frame-pointer", "-g", "-O1"]
    extra_compile_args = flags
    extra_link_args = flags

def _has_zlib() -> bool:
    """zlib (for deflated transfer syntax) is optional: a machine without its headers still
    builds the reader, which then raises UnsupportedFeature on deflated files."""
    import shutil
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "z.cpp")
        with open(src, "w") as f:
            f.write("#include <zlib.h>\nint main() { return zlibVersion() == nullptr; }\n")
        return subprocess.run([cxx, src, "-lz", "-o", os.path.join(tmp, "z")], capture_output=True).returncode == 0


zlib = _has_zlib()
ext = Pybind11Extension(
    "cxrfast._dicom",
    sources,
    include_dirs=["csrc/include"],
    libraries=["z"] if zlib else [],
    define_macros=[] if zlib else [("CXRFAST_NO_ZLIB", "1")],
    cxx_std=17,
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
