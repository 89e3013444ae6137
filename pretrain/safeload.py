"""The one way this project reads a checkpoint file: nothing in a checkpoint can run code.

A pickle can name any importable callable (``os.system``, ``builtins.exec``, ...) and have the unpickler call it, so
an unrestricted ``torch.load`` or plain ``pickle`` load of a downloaded ``.pth`` / ``.pkl`` runs whatever its author
wanted. Here:

- :func:`load_torch` reads ``torch.save`` files (zip and legacy format) with ``torch.load(weights_only=True)``: tensors,
  containers, numbers and strings (torch's own allow-list), plus, for that one call only (a context manager, never a
  global registration), the few plain-data types the published formats and our own checkpoints hold:
  :data:`TORCH_SAFE_GLOBALS`.
- :func:`load_pickle` reads plain pickles (detectron2's ``.pkl`` weights) with an unpickler that resolves only the
  names of :data:`PICKLE_SAFE_GLOBALS` (plain containers and numeric numpy arrays / scalars).

Anything else the file asks for is refused with :class:`UnsafeCheckpointError`, naming the file and the global, before
it is called; a file that is not a checkpoint at all (random bytes, text, truncated) raises
:class:`UnreadableCheckpointError` naming the file and the cause. Both are ``ValueError``\\ s.
"""
import argparse
import io
import os
import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict
from typing import Callable, Dict, List

import numpy as np
import torch

__all__ = ["load_torch", "load_pickle", "CheckpointError", "UnsafeCheckpointError", "UnreadableCheckpointError",
           "TORCH_SAFE_GLOBALS", "PICKLE_SAFE_GLOBALS"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; ``path`` is the file."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


class UnreadableCheckpointError(CheckpointError):
    """Not a checkpoint of the expected kind at all: random bytes, a text file, a truncated download."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks the unpickler for a global outside the allow-list (``global_name``); nothing was called."""

    def __init__(self, message: str, path: str, global_name: str):
        super().__init__(message, path)
        self.global_name = global_name


# ---------------------------------------------------------------------------------------------------------------
# The allow-lists. Every entry is a constructor of plain data: it builds a value from numbers / bytes / strings and
# calls nothing named by the file (anything nested inside goes through the same restricted unpickler).

_np_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy >= 2 / 1.x
# Plain-data numpy dtypes: booleans, integers, floats, complex numbers, fixed-width bytes / str. Not object
# (holds references to Python objects), void (structured, may nest object fields) or datetime (not needed).
_PLAIN_DTYPE_CODES = "?bhilqpBHILQPefdgFDGSU"
_DTYPE_CLASSES = sorted({type(np.dtype(c)) for c in _PLAIN_DTYPE_CODES}, key=lambda t: t.__name__)


def _numpy_globals() -> List:
    """numpy's pickle entry points for arrays and scalars, under the module names numpy 2 writes (``numpy._core``)
    and numpy 1.x wrote (``numpy.core``) -- the names are what the allow-list matches; the objects are numpy 2's."""
    out = []
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out += [(_np_multiarray._reconstruct, f"{mod}._reconstruct"),  # empty array of a subtype; data via BUILD
                (_np_multiarray.scalar, f"{mod}.scalar")]              # a numpy scalar from (dtype, raw bytes)
    return out


def _frombuffer_globals() -> List:
    """Pickle protocol 5 writes arrays as ``numpy._core.numeric._frombuffer(bytes, dtype, shape, order)``."""
    numeric = np._core.numeric if hasattr(np, "_core") else np.core.numeric
    return [(numeric._frombuffer, f"{mod}._frombuffer") for mod in ("numpy._core.numeric", "numpy.core.numeric")]


#: Extra globals :func:`load_torch` allows beyond torch's own weights-only list (tensors, ``OrderedDict``, ``set``,
#: ``complex``, ``bytearray``, ``_codecs.encode``, torch dtypes / devices / sizes). Why each is safe:
#:
#: - ``argparse.Namespace``: an attribute bag (``args`` of MoCo / SwAV / DINO checkpoints); built empty, then its
#:   ``__dict__`` is filled with already-unpickled plain values; it has no behaviour of its own.
#: - ``numpy.ndarray``, ``numpy.(_)core.multiarray._reconstruct``: an empty array of a given shape, filled from raw
#:   bytes by ``ndarray.__setstate__`` (our iteration checkpoints hold ``np.random.get_state()``, a uint32 array).
#: - ``numpy.dtype`` and the plain-data dtype classes ``numpy.dtypes.*DType`` (bool, ints, floats, complex,
#:   bytes, str; torch's unpickler only runs ``__setstate__`` on instances of listed classes, so listing these and
#:   not ``ObjectDType`` refuses object arrays): a dtype from a type code.
#: - ``numpy.(_)core.multiarray.scalar``: a numpy scalar from a dtype and its raw bytes (e.g. an ``np.float64`` in
#:   ``args``).
TORCH_SAFE_GLOBALS: List = [argparse.Namespace, np.ndarray, np.dtype, *_DTYPE_CLASSES, *_numpy_globals()]


class _Refused(pickle.UnpicklingError):
    """Raised inside :func:`load_pickle`'s unpickler; becomes an :class:`UnsafeCheckpointError`."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _plain_dtype(*args):
    """``numpy.dtype`` for :func:`load_pickle`, refusing dtypes that hold Python objects."""
    dt = np.dtype(*args)
    if dt.hasobject:
        raise _Refused(f"numpy.dtype({str(dt)!r}) (an array of Python objects)")
    return dt


#: What :func:`load_pickle` resolves (module.name -> object); everything else is refused. Plain containers, strings,
#: numbers, bytes, True/False/None need no global at all. Why each entry is safe:
#:
#: - ``collections.OrderedDict``, ``builtins.set`` / ``frozenset`` / ``complex`` / ``bytearray``: containers and
#:   numbers, built from already-unpickled plain values.
#: - ``_codecs.encode``: how Python 3 pickles ``bytes`` at protocol <= 2 (``encode(str, "latin1")``; a codec name
#:   only selects a registered text codec).
#: - numpy arrays and scalars (``numpy.ndarray``, ``numpy.(_)core.multiarray._reconstruct`` / ``scalar``,
#:   ``numpy.(_)core.numeric._frombuffer`` (protocol 5), ``numpy.dtype``): what detectron2 / Detectron / Caffe2
#:   ``.pkl`` weights hold, in the names numpy 1.x (and the Python 2 pickles of Detectron's model zoo) and numpy 2
#:   write; each builds an array / scalar from a dtype and raw bytes, and ``numpy.dtype`` refuses object dtypes.
PICKLE_SAFE_GLOBALS: Dict[str, Callable] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
    "builtins.bytearray": bytearray, "__builtin__.set": set, "__builtin__.frozenset": frozenset,  # Python 2 names
    "_codecs.encode": __import__("_codecs").encode,
    "numpy.ndarray": np.ndarray, "numpy.dtype": _plain_dtype,
    **{name: obj for obj, name in _numpy_globals() + _frombuffer_globals()},
}


# ---------------------------------------------------------------------------------------------------------------
def _describe(what: str, path: str) -> str:
    return f"{what} {path}" if what else str(path)


def _unsafe(path: str, what: str, name: str, resave: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{_describe(what, path)}: refused: it asks the unpickler for {name}, which is not plain data (tensors, "
        f"arrays, numbers, strings, containers); loading it could run code chosen by whoever wrote the file. This "
        f"project refuses to run code from a checkpoint; if you trust the file, re-save its tensors with {resave} "
        f"and give that file instead.", path, name)


_TORCH_RESAVE = ("`torch.save(state_dict, 'clean.pth')` after loading it without the weights-only restriction in a "
                 "Python session you trust (keep only tensors, numbers and strings)")
_PICKLE_RESAVE = ("`pickle.dump({'model': {k: numpy array}, '__author__': ..., 'matching_heuristics': ...}, f)` "
                  "(in a Python session you trust; plain dicts of numpy arrays only)")

# torch's weights-only unpickler messages that mean "the file asked for something not allowed"
_REFUSALS = (
    re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global"),
    re.compile(r"Trying to call reduce for unrecognized function (.+?)(?: which belongs|\n|$)"),
    re.compile(r"Can only create new object for nn\.Parameter or classes allowlisted via `add_safe_globals` but "
               r"got (.+?)(?:\n|$)"),
    re.compile(r"Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but "
               r"got (.+?)(?:\n|$)"),
)


def _type_name(text: str) -> str:
    m = re.fullmatch(r"<class '([^']+)'>", text.strip())
    return m.group(1) if m else text.strip()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:  # torch's long weights-only message: keep the unpickler's own words
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return f"{type(e).__name__}: {text.splitlines()[0].rstrip('.') if text else '(no message)'}"


def _sniff(path: str) -> str:
    """What the start of a file looks like, for "cannot read" messages."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return ""
    if not head:
        return "; the file is empty"
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        return ""  # a zip archive / a pickle: the error itself says what is wrong with it
    try:
        text = head.decode("utf-8")
        if text.isprintable() or all(c.isprintable() or c.isspace() for c in text):
            return f"; it looks like a text file (starts {text[:40]!r})"
    except UnicodeDecodeError:
        pass
    return f"; it is neither a zip archive nor a pickle (starts with bytes {head[:8]!r})"


def _pickle_globals(data: bytes) -> List[str]:
    """``module.name`` of every GLOBAL / INST / STACK_GLOBAL in a pickle stream (several concatenated pickles, as in
    torch's legacy format), read statically; stops quietly at the first byte that is not a pickle opcode."""
    names: List[str] = []
    strings: List[str] = []
    pos = 0
    try:
        while pos < len(data):
            stream = io.BytesIO(data[pos:])
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
            pos += stream.tell()
    except Exception:  # not (or no longer) a pickle: what was found so far is all there is
        pass
    return names


def _torch_pickle_globals(path: str) -> List[str]:
    """The globals the pickle inside a ``torch.save`` file names (zip: its ``data.pkl``; legacy: the whole file)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return [g for n in z.namelist() if n.endswith("data.pkl") for g in _pickle_globals(z.read(n))]
        with open(path, "rb") as f:
            return _pickle_globals(f.read(64 << 20))
    except Exception:
        return []


def _torch_allowed_names() -> set:
    from torch import _weights_only_unpickler as wou

    return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())


def load_torch(path: str, what: str = "checkpoint"):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with :data:`TORCH_SAFE_GLOBALS` allowed for this
    call. ``what`` names the file in errors (e.g. ``"MODEL.TEACHER.WEIGHTS"``).

    Raises ``FileNotFoundError`` (no such file), :class:`UnsafeCheckpointError` (the file asks for any other
    global; nothing of it is called) or :class:`UnreadableCheckpointError` (not a PyTorch checkpoint)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_describe(what, path)} does not exist")
    already = torch.serialization.get_safe_globals()
    extra = [g for g in TORCH_SAFE_GLOBALS if g not in already]  # never remove what someone else registered
    try:
        with torch.serialization.safe_globals(extra):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                for pattern in _REFUSALS:
                    m = pattern.search(str(e))
                    if m:
                        raise _unsafe(path, what, _type_name(m.group(1)), _TORCH_RESAVE) from None
                # e.g. a protocol-0 INST opcode ("Unsupported operand"): name the global if the pickle has one
                allowed = _torch_allowed_names()
                refused = [g for g in _torch_pickle_globals(path) if g not in allowed]
                if refused:
                    raise _unsafe(path, what, refused[0], _TORCH_RESAVE) from None
                raise
    except CheckpointError:
        raise
    except OSError:
        raise
    except Exception as e:  # random bytes, text, truncated zip, ...: torch's RuntimeError / UnpicklingError / ...
        raise UnreadableCheckpointError(
            f"{_describe(what, path)}: cannot read it as a PyTorch checkpoint (torch.save file): {_first_line(e)}"
            f"{_sniff(path)}. Is it a complete download of the right file?", path) from e


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str, what: str, encoding: str):
        super().__init__(f, encoding=encoding)
        self.path, self.what = path, what

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full in PICKLE_SAFE_GLOBALS:
            return PICKLE_SAFE_GLOBALS[full]
        raise _unsafe(self.path, self.what, full, _PICKLE_RESAVE)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not plain data")


def load_pickle(path: str, what: str = "detectron2 weights", encoding: str = "latin1"):
    """A plain pickle (detectron2 / Detectron ``.pkl`` weights) read with an unpickler that resolves only
    :data:`PICKLE_SAFE_GLOBALS`. ``encoding``: how Python 2 ``str`` objects are decoded (``"latin1"`` as detectron2
    reads the Detectron / Caffe2 model zoo; ``"bytes"`` for the CIFAR python batches). Raises ``FileNotFoundError``,
    :class:`UnsafeCheckpointError` or :class:`UnreadableCheckpointError` as :func:`load_torch`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_describe(what, path)} does not exist")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path, what, encoding).load()
    except CheckpointError:
        raise
    except _Refused as e:
        raise _unsafe(path, what, e.name, _PICKLE_RESAVE) from None
    except OSError:
        raise
    except Exception as e:
        hint = (" It is a zip file: a torch.save checkpoint, not a pickle; give a .pth name (detectron2 reads .pkl "
                "files as plain pickles)." if zipfile.is_zipfile(path) else "")
        raise UnreadableCheckpointError(
            f"{_describe(what, path)}: cannot read it as a pickle of plain data: {_first_line(e)}{_sniff(path)}."
            f"{hint}", path) from e

