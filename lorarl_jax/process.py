"""Process-level settings of the training runtime: host memory and what gets imported.

`lorarl_jax.main` calls `configure()` before anything else is imported; scripts that measure the
runtime do the same. Library users (tests, notebooks) get none of it unless they call it.

- glibc malloc, one arena (`mallopt(M_ARENA_MAX, 1)`): XLA:CPU runs a program on a pool of
  threads, and glibc gives each thread its own arena, so the buffers one phase frees (rollout's
  merged weights and KV cache) sit in arenas the next phase's threads do not allocate from.
  `release_free_memory()` (`malloc_trim(0)`) hands the free heap back to the system between
  phases. Measured on the demo (2 cores, Intel Xeon, micro-batches of 8 rows): peak RSS 3.95
  GiB → 3.16 (one arena) → 2.97 in every update after the first (and the trim; the first,
  which compiles, 3.18), at the same s/step. A user's own `MALLOC_ARENA_MAX` wins;
  `LORARL_MALLOC=0` leaves malloc alone. Not glibc (macOS, musl): nothing is changed.
- transformers ≥ 5 imports torch with its configuration classes whenever torch is installed
  (+0.1–0.4 GiB RSS and torch's thread pools); the runtime uses transformers for configs and
  tokenizers only, so `import_without_torch()` imports those modules (and tensorboardX, which
  also takes torch when it can) with torch hidden. transformers then reports torch unavailable
  for the rest of the process (a reward function may still `import torch` itself, but not run
  transformers' torch models in-process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import importlib.util
import os
import sys

_M_ARENA_MAX = -8  # glibc malloc.h


@functools.cache  # dlopen once: release_free_memory runs every phase
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _glibc(libc) -> bool:
    return libc is not None and hasattr(libc, "gnu_get_libc_version")


def configure_malloc() -> bool:
    """One malloc arena for the process (call before threads start); True if it was set."""
    if os.environ.get("LORARL_MALLOC", "1") == "0" or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    return _glibc(libc) and libc.mallopt(_M_ARENA_MAX, 1) == 1


def release_free_memory() -> bool:
    """Returns the free part of the malloc heap to the system (between run phases)."""
    if os.environ.get("LORARL_MALLOC", "1") == "0":
        return False
    libc = _libc()
    if not _glibc(libc):
        return False
    libc.malloc_trim(0)
    return True


def peak_rss_gib() -> float | None:
    """The process's peak resident set so far (Linux `VmHWM`, GiB; None elsewhere). The trainer
    logs it after each phase (`perf/peak_rss_*_gib`): the first phase where it reaches its final
    value is where the process peaks."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


# what the runtime imports that would import torch if it could (tensorboardX: metrics.py)
_TORCH_OPTIONAL = ("transformers.configuration_utils", "transformers.models.auto", "tensorboardX")


_hidden = {"torch": False}


def torch_hidden() -> bool:
    """True once `import_without_torch` ran here: transformers then reports torch unavailable, so
    what needs torch through transformers (the one-time GGUF tokenizer conversion) must run in
    a child interpreter (`model/convert.py` does)."""
    return _hidden["torch"]


def import_without_torch() -> bool:
    """Imports transformers' config/tokenizer modules and tensorboardX with torch hidden; False
    if torch or transformers was already imported (then nothing changes)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # not "PyTorch was not found"
    if "torch" in sys.modules or "transformers" in sys.modules:
        return False
    sys.modules["torch"] = None  # `import torch` raises ImportError, find_spec says absent
    try:
        for name in _TORCH_OPTIONAL:
            if importlib.util.find_spec(name.split(".")[0]) is not None:
                importlib.import_module(name)
        from transformers import AutoConfig, AutoTokenizer  # noqa: F401  (resolve lazily now)
    finally:
        del sys.modules["torch"]
    _hidden["torch"] = True
    return True


def configure() -> None:
    """Everything above, for a training process."""
    configure_malloc()
    import_without_torch()
