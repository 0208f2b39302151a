"""Makes google-jetstream 0.2.2 importable beside jax ≥ 0.10 without TensorFlow.

JetStream 0.2.2 is the last PyPI release. Its declared dependencies pull seqio → TensorFlow
(~2.5 GB), so the `serve` extra installs its light dependencies and JetStream itself with
`pip install --no-deps google-jetstream==0.2.2` (see pyproject.toml). Three things then need care,
all outside the code paths this package uses; `ensure_importable()` handles them, once, before the
first `import jetstream`:

1. seqio: `jetstream.engine.token_utils` (imported by `engine_api`) and `mock_utils` import
   `seqio.vocabularies` at module level, for JetStream's own SentencePiece and mock tokenizers.
   Our engine brings its own tokenizer (a HF tokenizer, `engine.HFTokenizer`). When seqio is not
   installed, a stub module `seqio.vocabularies` is registered with placeholder `Vocabulary` and
   `SentencePieceVocabulary` classes; creating a `SentencePieceVocabulary` raises ImportError.
   An installed seqio is used as is.
2. `jax.tree_map` was removed in jax 0.10; `jetstream.core.orchestrator.delete_pytree` (which frees
   each prefill result after insert) still calls it. If missing, `jax.tree_map` is set to
   `jax.tree.map` (same semantics). This adds one attribute to the `jax` module, process-wide.
3. Importing `jetstream.core.orchestrator` sets the root logger to DEBUG and adds a stdout handler
   (a line per generate step). The root logger's level and handlers are restored after import.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import jax

_SEQIO_MSG = (
    "JetStream's SentencePiece tokenizer needs the real seqio (`pip install seqio`, which pulls "
    "TensorFlow); lorarl_jax serves with its Hugging Face tokenizer adapter instead"
)


def _seqio_stub() -> types.ModuleType:
    vocabularies = types.ModuleType("seqio.vocabularies")
    vocabularies.__doc__ = "Stub from lorarl_jax.sampling.jetstream_compat (seqio not installed)."

    class Vocabulary:  # base class of jetstream.engine.mock_utils.TestVocab
        pass

    class SentencePieceVocabulary(Vocabulary):
        def __init__(self, *args, **kwargs):
            raise ImportError(_SEQIO_MSG)

    vocabularies.Vocabulary = Vocabulary
    vocabularies.SentencePieceVocabulary = SentencePieceVocabulary
    seqio = types.ModuleType("seqio")
    seqio.__doc__ = vocabularies.__doc__
    seqio.vocabularies = vocabularies
    return seqio


def ensure_importable() -> None:
    """Applies the three fixes above (idempotent); raises ImportError if JetStream is missing."""
    if importlib.util.find_spec("jetstream") is None:
        raise ImportError(
            "JetStream is not installed: pip install -e '.[serve]' && "
            "pip install --no-deps google-jetstream==0.2.2"
        )
    if "seqio" not in sys.modules and importlib.util.find_spec("seqio") is None:
        stub = _seqio_stub()
        sys.modules["seqio"] = stub
        sys.modules["seqio.vocabularies"] = stub.vocabularies
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree.map
    if "jetstream.core.orchestrator" not in sys.modules:
        root = logging.getLogger()
        level, handlers = root.level, list(root.handlers)
        try:
            import jetstream.core.orchestrator  # noqa: F401
        finally:
            root.setLevel(level)
            for h in list(root.handlers):
                if h not in handlers:
                    root.removeHandler(h)
