"""The project's one config language: fvcore's ``CfgNode`` (detectron2's is the same class) with ``_BASE_``
inheritance, ``KEY VALUE`` overrides, and strict YAML: a file with a duplicated key is rejected (PyYAML silently
keeps the last occurrence, which is how the official DisCo VOC config lost three keys).
"""
import os

import yaml
from fvcore.common.config import CfgNode as _FvcoreCfgNode


class DuplicateKeyError(ValueError):
    pass


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


def check_yaml_duplicates(filename: str) -> None:
    """Raise :class:`DuplicateKeyError` naming the key and file if ``filename`` repeats a key at any level."""
    with open(filename) as f:
        text = f.read()
    loader = _StrictLoader(text)
    loader.filename = filename
    try:
        loader.get_single_data()
    finally:
        loader.dispose()


class StrictYamlMixin:
    """Mix into any fvcore-derived CfgNode (ours, detectron2's) to reject duplicate keys in every file of a
    ``_BASE_`` chain. fvcore's loader calls ``cls.load_yaml_with_base`` recursively for each base."""

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False):
        check_yaml_duplicates(filename)
        return super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)


class CfgNode(StrictYamlMixin, _FvcoreCfgNode):
    pass


CN = CfgNode


def merge_and_freeze(cfg: CfgNode, config_file: str, opts, validate) -> CfgNode:
    """The one config path of every CLI: merge ``config_file`` and the ``KEY VALUE`` ``opts`` into ``cfg``,
    ``validate(cfg)``, freeze."""
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file!r} does not exist")
        cfg.merge_from_file(config_file)
    if opts:
        if len(opts) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
        cfg.merge_from_list(ints_as_floats(cfg, list(opts)))
    validate(cfg)
    cfg.freeze()
    return cfg


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
