"""Custom reward functions from files: `"path/to/file.py:function_name"` → the callable.

A missing file raises `FileNotFoundError`; a malformed spec, a file that does not import
(SyntaxError with its line, or any exception raised while importing it), a missing name (the
file's functions are listed) or a non-callable one raise `ValueError`. Each message is one line
naming the file and the `data.reward_fns` entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import sys
import traceback
from collections.abc import Callable


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _import_error(path: pathlib.Path, exc: Exception, where: str) -> ValueError:
    """`reward file <path>: <Type> at line <n>: <message> (<where>)`, one line."""
    if isinstance(exc, SyntaxError):
        in_file = "" if exc.filename in (None, str(path)) else f" in {exc.filename}"
        line = f" at line {exc.lineno}" if exc.lineno else ""
        detail = f"SyntaxError{in_file}{line}: {_one_line(exc.msg)}"
    else:
        lines = [
            f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)
        ]
        line = f" at line {lines[-1]}" if lines else ""
        detail = f"{type(exc).__name__}{line}: {_one_line(exc)}"
    return ValueError(f"reward file {path}: {detail} ({where})")


def load_reward_fn(spec: str) -> Callable:
    """Import `function_name` from `"path/to/file.py:function_name"`.

    Raises `FileNotFoundError` for a missing file and `ValueError` for a malformed spec, a file
    that fails to import (SyntaxError with its line, or any exception raised while importing),
    a missing name (listing the functions the file defines) or a non-callable one; each message
    is one line naming the file and the `data.reward_fns` entry.
    """
    where = f"data.reward_fns {spec!r}"
    path_str, sep, fn_name = spec.rpartition(":")
    if not sep or not path_str or not fn_name:
        raise ValueError(
            f"{where}: must be 'builtin', 'format', 'flexible' or 'path/to/file.py:function_name'"
        )
    path = pathlib.Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reward file not found: {path} ({where})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    module_name = f"_lorarl_reward_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward file {path}: cannot import it as a Python module ({where})")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so dataclasses/pickle inside the file resolve
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise _import_error(path, exc, where) from exc
    except BaseException:  # KeyboardInterrupt, SystemExit: not ours to translate
        del sys.modules[module_name]
        raise
    if not hasattr(module, fn_name):
        defined = sorted(
            k
            for k, v in vars(module).items()
            if callable(v) and k[0] != "_" and getattr(v, "__module__", None) == module_name
        )
        raise ValueError(
            f"reward file {path} has no function {fn_name!r}; it defines {defined} ({where})"
        )
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise ValueError(
            f"reward file {path}: {fn_name!r} is a {type(fn).__name__}, not a function ({where})"
        )
    return fn
