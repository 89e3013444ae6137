#!/usr/bin/env python
"""Make ``import detectron2`` work in the current Python environment.

Two routes, in this order:

1. A detectron2 is already importable (e.g. a cluster build from upstream source, per detectron2's own
   install guide): use it and change nothing.
2. Otherwise install the PyPI re-upload ``sal-detectron2`` (upstream's Python package, Apache-2.0). It is a
   ``cp310-none-any`` wheel, so pip will not install it into other Pythons directly: we unpack it with
   ``--python-version 3.10 --target`` into a temporary folder and copy only its ``detectron2/`` package into this
   environment's site-packages. The wheel also carries a stray top-level ``tools`` package; it is deliberately
   left behind so it can never shadow this project's ``tools/``. Its compiled ``_C`` is built for CUDA 12 /
   Python 3.10 and does not load elsewhere; C4 Faster/Mask R-CNN only need torchvision's ops, and COCOEvaluator
   falls back to pycocotools when ``_C`` is missing.

detectron2's pure-Python requirements are installed by ``pip install -e .[detectron2-deps]`` (see Makefile).
To remove the re-upload: delete ``<site-packages>/detectron2``.
"""
import argparse
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REUPLOAD = "sal-detectron2==0.7.2"


def existing_detectron2():
    spec = importlib.util.find_spec("detectron2")
    return None if spec is None else Path(spec.origin).parent


def install_reupload(requirement: str, site_packages: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="d2-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--python-version", "3.10",
               "--only-binary=:all:", "--target", tmp, requirement]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        src = Path(tmp) / "detectron2"
        if not (src / "__init__.py").is_file():
            raise SystemExit(f"{requirement} did not contain a detectron2/ package (found: {sorted(p.name for p in Path(tmp).iterdir())})")
        dst = site_packages / "detectron2"
        if dst.exists():
            raise SystemExit(f"{dst} exists but does not import; remove it and rerun")
        shutil.copytree(src, dst)
    return dst


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requirement", default=REUPLOAD, help="pip requirement of the re-upload wheel")
    args = parser.parse_args()
    found = existing_detectron2()
    if found is not None:
        print(f"detectron2 already installed at {found}; using it")
        return
    dst = install_reupload(args.requirement, Path(sysconfig.get_paths()["purelib"]))
    # Verify in a fresh interpreter: the model zoo and the config system must import.
    subprocess.run([sys.executable, "-c", "import detectron2, detectron2.config, detectron2.modeling, detectron2.model_zoo"],
                   check=True)
    print(f"installed {args.requirement} as {dst}")


if __name__ == "__main__":
    main()
