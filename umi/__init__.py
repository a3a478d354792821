"""The ``umi`` command and the compositions that run several services together.

This package sits above ``services/`` and ``evaluation/`` and may import them all;
nothing below imports it (``import-linter`` contracts in ``pyproject.toml``).
"""
