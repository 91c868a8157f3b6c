"""Tuning methods: one module each, registered by name (a new method is one file + one import here)."""

from . import adapter, bitfit, deep, ia3, layernorm, lock, lora, unlock  # noqa: F401  (registers them)
from .base import (METHODS, MethodResult, MethodSpec, Selection, check_layers, get_method, register_method,
                   select)

__all__ = ["METHODS", "MethodResult", "MethodSpec", "Selection", "check_layers", "get_method", "register_method",
           "select"]
