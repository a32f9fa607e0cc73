"""A preload library that makes ``operator new`` throw ``std::bad_alloc`` on the thread that
has just started its n-th thread, so that tests can check what native code does when a
thread pool stops growing with threads already running (the std::thread state or the vector
of threads cannot be allocated). Without a catch-all, the joinable threads' destructors call
std::terminate. Linux with a C++ compiler only; ``build`` returns None elsewhere."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <atomic>
#include <cstdlib>
#include <new>

static std::atomic<int> armed{0};           // thread starts left before the fault
static thread_local bool fail_next_new = false;

extern "C" void cxr_fault_after_threads(int n) { armed = n; }

extern "C" int pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*f)(void*), void* arg) {
  using Fn = int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
  static Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_create"));
  int rc = real(t, a, f, arg);
  if (rc == 0 && armed.load() > 0 && --armed == 0) fail_next_new = true;
  return rc;
}

void* operator new(std::size_t n) {
  if (fail_next_new) {
    fail_next_new = false;
    throw std::bad_alloc();
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
"""


def build(folder: Path) -> Path | None:
    """Compiles the preload library into folder; None without Linux or a C++ compiler."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not sys.platform.startswith("linux") or not cxx:
        return None
    src, lib = folder / "thread_fault.cpp", folder / "thread_fault.so"
    src.write_text(SOURCE)
    done = subprocess.run([cxx, "-shared", "-fPIC", "-O1", str(src), "-o", str(lib), "-ldl"], capture_output=True)
    return lib if done.returncode == 0 else None


def run(script: str, lib: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs python -c script with lib preloaded and the worktree first on the path; the script
    arms the fault with ``ctypes.CDLL(None).cxr_fault_after_threads(n)``."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, LD_PRELOAD=str(lib), PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=root)
