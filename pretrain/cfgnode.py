"""The project's one config language: fvcore's ``CfgNode`` (detectron2's is the same class) with ``_BASE_``
inheritance, ``KEY VALUE`` overrides, and strict YAML: a file with a duplicated key is rejected (PyYAML silently
keeps the last occurrence, which is how the official DisCo VOC config lost three keys).
"""
import contextlib
import copy
import difflib
import os
import re
import threading
from typing import Callable, List, Sequence, Tuple

import yaml
from fvcore.common.config import CfgNode as _FvcoreCfgNode


class ConfigError(ValueError):
    """A config that cannot run as the user wrote it: a key that does not exist, a value of the wrong type or out of
    range, an inconsistent combination, a broken config file. The message names the key or file and the fix; the
    command-line tools print it as one ``error:`` line, without a traceback (:func:`pretrain.cli.user_errors`)."""


class UnknownKeyError(ConfigError):
    """A key, on the command line or in a config file, that the config does not have."""


class DuplicateKeyError(ConfigError):
    """A config file that sets the same key twice."""


class ConfigFileError(ConfigError):
    """A config file that is not valid YAML, not a mapping, or part of a cyclic ``_BASE_`` chain."""


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice."""

    filename = "<string>"

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(
                    f"duplicate key {key!r} in {self.filename} (line {seen[key] + 1} and line "
                    f"{key_node.start_mark.line + 1}); YAML would silently keep only the last one. "
                    f"Merge the two {key!r} blocks into one.")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def check_yaml_duplicates(filename: str):
    """Parse ``filename`` strictly and return its data. Raises :class:`DuplicateKeyError` naming the key and file if
    it repeats a key at any level, :class:`ConfigFileError` naming the file and line for invalid YAML or a top level
    that is not a ``KEY: value`` mapping."""
    with open(filename) as f:
        text = f.read()
    loader = _StrictLoader(text)
    loader.filename = filename
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({e.context}, line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise ConfigFileError(f"{filename}{where}: invalid YAML: {e.problem or e}{context}") from None
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{filename}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        got = "nothing (an empty file)" if data is None else f"a {type(data).__name__}"
        raise ConfigFileError(f"{filename}: a config file must be a mapping of KEY: value, got {got}")
    return data


_LOADING = threading.local()  # the chain of files whose _BASE_ is being loaded (per thread)


class StrictYamlMixin:
    """Mix into any fvcore-derived CfgNode (ours, detectron2's) to reject, in every file of a ``_BASE_`` chain,
    duplicate keys, invalid YAML (naming file and line) and a cycle (naming its files). fvcore's loader calls
    ``cls.load_yaml_with_base`` recursively for each base."""

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False):
        chain = getattr(_LOADING, "chain", None)
        if chain is None:
            chain = _LOADING.chain = []
        remote = "://" in str(filename)
        key = str(filename) if remote else os.path.realpath(filename)
        if key in chain:
            cycle = chain[chain.index(key):] + [key]
            raise ConfigFileError("cyclic _BASE_ chain: " + " -> ".join(cycle) + "; remove one of these _BASE_ keys")
        if chain and not remote and not os.path.isfile(filename):
            raise FileNotFoundError(f"{filename}, the _BASE_ of {chain[-1]}, does not exist")
        chain.append(key)
        try:
            if not remote:
                check_yaml_duplicates(filename)
            return super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)
        finally:
            chain.pop()


class ChoiceError(ConfigError):
    """A value outside the allowed values of a key declared with :meth:`CfgNode.set_choices`."""

    def __init__(self, key: str, value, choices, where: str = ""):
        self.key, self.value, self.choices = key, value, tuple(choices)
        allowed = ", ".join(str(c) for c in self.choices)
        super().__init__(f"{key} {value!r}{f' ({where})' if where else ''}: allowed values are {allowed}")


class ChoicesMixin:
    """Keys whose value is one of a fixed set of values of different types, e.g. ``True``, ``False`` or ``"auto"``.

    yacs refuses a value of another type than the default's (a yaml ``True`` for the default ``"auto"``); a key
    declared with :meth:`set_choices` (on the root node) instead takes exactly its listed values, from a yaml file
    (``ENABLED: True``, ``ENABLED: auto``) and from the command line (``TRAIN.AMP.ENABLED True`` / ``False`` /
    ``auto``), and any other value raises :class:`ChoiceError` naming the key and the allowed values. The
    declarations live in the node's ``__dict__`` (as yacs' own flags), so ``clone()`` and pickling keep them."""

    def set_choices(self, key: str, choices: Sequence) -> None:
        """Declare that the dotted ``key`` (which must exist) takes exactly one of ``choices``."""
        cfg_value(self, key)  # KeyError for a key that does not exist
        self.__dict__.setdefault("__choices__", {})[key] = tuple(choices)

    def choices(self, key: str):
        """The allowed values of ``key``, or None for an ordinary key."""
        return self.__dict__.get("__choices__", {}).get(key)

    def _set_choice(self, key: str, value) -> None:
        allowed = self.choices(key)
        # bool is an int: 1 is not True here, and "true" is not True either
        if not any(type(value) is type(c) and value == c for c in allowed):
            raise ChoiceError(key, value, allowed)
        *parents, leaf = key.split(".")
        node = self
        for part in parents:
            node = node[part]
        node[leaf] = value

    def merge_from_other_cfg(self, cfg_other):
        declared = self.__dict__.get("__choices__", {})
        present = [k for k in declared if _has_key(cfg_other, k)]
        if present:
            cfg_other = copy.deepcopy(cfg_other)
            for key in present:
                *parents, leaf = key.split(".")
                node = cfg_other
                for part in parents:
                    node = node[part]
                self._set_choice(key, node.pop(leaf))
        return super().merge_from_other_cfg(cfg_other)

    def merge_from_list(self, cfg_list):
        declared = self.__dict__.get("__choices__", {})
        rest = []
        for key, value in zip(list(cfg_list)[0::2], list(cfg_list)[1::2]):
            if key in declared:
                self._set_choice(key, self._decode_cfg_value(value))
            else:
                rest += [key, value]
        if len(cfg_list) % 2:
            rest.append(cfg_list[-1])  # let yacs refuse the odd list as it does
        return super().merge_from_list(rest)


def _has_key(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


class CfgNode(ChoicesMixin, StrictYamlMixin, _FvcoreCfgNode):
    pass


CN = CfgNode


def merge_and_freeze(cfg: CfgNode, config_file: str, opts, validate) -> CfgNode:
    """The one config path of every CLI: merge ``config_file`` and the ``KEY VALUE`` ``opts`` into ``cfg``,
    ``validate(cfg)``, freeze. A key the config does not have raises :class:`UnknownKeyError` (with the closest
    existing keys), a value of another type than the key's :class:`ConfigError`, both naming the key."""
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file!r} does not exist")
        with _merge_errors(cfg, f"set in {config_file} or a _BASE_ file it inherits"):
            cfg.merge_from_file(config_file)
    if opts:
        opts = list(opts)
        if len(opts) % 2:
            raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd number: {opts}")
        for key in opts[0::2]:
            _check_key(cfg, str(key))
        with _merge_errors(cfg, "on the command line"):
            cfg.merge_from_list(ints_as_floats(cfg, opts))
    validate(cfg)
    cfg.freeze()
    return cfg


def all_keys(cfg: CfgNode, prefix: str = "") -> List[str]:
    """Every leaf key of ``cfg`` as a dotted name, e.g. ``SOLVER.BASE_LR``."""
    out = []
    for k, v in cfg.items():
        out += all_keys(v, f"{prefix}{k}.") if isinstance(v, _FvcoreCfgNode) else [f"{prefix}{k}"]
    return out


def _unknown_key(cfg: CfgNode, key: str, where: str) -> UnknownKeyError:
    close = difflib.get_close_matches(key, all_keys(cfg), n=3, cutoff=0.75)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return UnknownKeyError(f"{key} ({where}) is not a config key{hint}")


def _check_key(cfg: CfgNode, key: str) -> None:
    """Raise :class:`UnknownKeyError` for a command-line key that names no leaf of ``cfg`` (keys the config declares
    deprecated or renamed are left to its own handling)."""
    if cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
        return
    node = cfg
    for part in key.split("."):
        if not isinstance(node, _FvcoreCfgNode) or part not in node:
            raise _unknown_key(cfg, key, "on the command line")
        node = node[part]
    if isinstance(node, _FvcoreCfgNode):
        raise UnknownKeyError(f"{key} (on the command line) is a group of keys, not a key: set one of "
                              f"{', '.join(all_keys(node, key + '.')[:8])}")


_TYPE_MISMATCH = re.compile(r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) "
                            r"for config key: (\S+)$", re.S)


@contextlib.contextmanager
def _merge_errors(cfg: CfgNode, where: str):
    """Turn yacs' messages for a user's mistake in a merge (``Non-existent config key``, ``Type mismatch``) into
    :class:`UnknownKeyError` / :class:`ConfigError` naming the key and where it was set."""
    try:
        yield
    except ChoiceError as e:
        raise ChoiceError(e.key, e.value, e.choices, where) from None
    except ConfigError:
        raise
    except (AssertionError, KeyError) as e:
        m = re.fullmatch(r"Non-existent (?:config )?key: (\S+)", e.args[0] if e.args and isinstance(e.args[0], str)
                         else "")
        if not m:
            raise
        raise _unknown_key(cfg, m.group(1), where) from e
    except ValueError as e:
        m = _TYPE_MISMATCH.match(str(e))
        if not m:
            raise
        want, got, default, value, key = m.groups()
        raise ConfigError(f"{key} {value} ({where}): the key takes a value of type {want} (default {default}), got "
                          f"a {got}") from e


def cfg_value(cfg: CfgNode, key: str):
    """``cfg_value(cfg, "SOLVER.EPOCHS")`` is ``cfg.SOLVER.EPOCHS``."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _range_test(allowed: str) -> Callable[[float], bool]:
    """``">= 1"``, ``"> 0"``, ``">= -1"``, ``"[0, 1]"``, ``"(0, 1]"``, ``"[0, 1)"`` -> a test of one number."""
    if allowed[0] in "[(":
        lo, hi = (float(x) for x in allowed[1:-1].split(","))
        lo_ok = (lambda v: v >= lo) if allowed[0] == "[" else (lambda v: v > lo)
        hi_ok = (lambda v: v <= hi) if allowed[-1] == "]" else (lambda v: v < hi)
        return lambda v: lo_ok(v) and hi_ok(v)
    op, bound = allowed.split()
    bound = float(bound)
    return {">=": lambda v: v >= bound, ">": lambda v: v > bound, "<=": lambda v: v <= bound,
            "<": lambda v: v < bound}[op]


RangeRule = Tuple[str, str, int]  # (key, allowed range, 0 for a number or the length of a sequence of numbers)


def check_ranges(cfg: CfgNode, rules: Sequence[RangeRule]) -> None:
    """Raise :class:`ConfigError` for the first key whose value is outside its range, e.g. ``SOLVER.EPOCHS 0 is out
    of range: must be >= 1``. A rule with a length checks a sequence of that many numbers, each in the range."""
    for key, allowed, length in rules:
        value, test = cfg_value(cfg, key), _range_test(allowed)
        allowed = allowed if allowed[0] in "<>" else f"in {allowed}"
        if length:
            if not isinstance(value, (list, tuple)) or len(value) != length:
                raise ConfigError(f"{key} {value!r} must be {length} numbers, each {allowed}")
            if not all(isinstance(v, (int, float)) and test(v) for v in value):
                raise ConfigError(f"{key} {tuple(value)} is out of range: each value must be {allowed}")
        elif not (isinstance(value, (int, float)) and test(value)):
            raise ConfigError(f"{key} {value!r} is out of range: must be {allowed}")


def ints_as_floats(cfg: CfgNode, opts: list) -> list:
    """``SOLVER.BASE_LR 3`` on the command line means 3.0: yacs would refuse an int for a float key."""
    out = list(opts)
    for i in range(0, len(out), 2):
        node = cfg
        for part in str(out[i]).split("."):
            node = node.get(part) if isinstance(node, _FvcoreCfgNode) else None
        if isinstance(node, float) and isinstance(out[i + 1], str):
            try:
                out[i + 1] = repr(float(int(out[i + 1])))
            except ValueError:
                pass
    return out


def save_cfg(cfg: CfgNode, path: str) -> None:
    """Write the resolved config (what a run really used) as yaml."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(cfg.dump())
