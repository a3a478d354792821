"""Evaluating the system against α-UMi's test data and exporting GLPFT training data.

* :mod:`evaluation.metrics` — the static metrics of the α-UMi paper (Table 1);
* :mod:`evaluation.static` — running every decision point of a test file through the system;
* :mod:`evaluation.trajectories`, :mod:`evaluation.glpft` — stored trajectories to GLPFT files.

It uses the common library (``shared``) only; the ``umi`` command wires it to the services.
"""
