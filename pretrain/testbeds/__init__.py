"""Testbeds: the student's own self-supervised objective. Every module here is imported and registers its class in
:data:`pretrain.methods.TESTBEDS`, so a new testbed is one file."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
