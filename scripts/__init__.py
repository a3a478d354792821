"""Operator scripts (benchmarks). A package only so that ``import-linter`` can check that they never import ``tests``."""
