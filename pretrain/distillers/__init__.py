"""Distillers: terms pulling the student towards a frozen teacher. Every module here is imported; a distiller's
module registers its class in :data:`pretrain.methods.DISTILLERS`, so a new distiller is one file (``queue`` holds
the queue helper the queue-based ones share)."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
