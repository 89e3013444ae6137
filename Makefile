# The three commands of the README. Everything lives in the virtual environment .venv of this checkout.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup demo test bench clean-venv

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test,detectron2-deps,dali]"
	$(PY) tools/install_detectron2.py
	$(PY) -c "import torch, torchvision, timm, fvcore, detectron2, submitit, pycocotools; print('set-up OK: torch', torch.__version__, 'timm', timm.__version__, 'detectron2', detectron2.__version__)"

demo:
	$(PY) tools/demo.py --output-dir $(DEMO_DIR)

test:
	$(PY) -m pytest -q tests

bench:
	$(PY) tools/bench_distill.py

clean-venv:
	rm -rf $(VENV)
