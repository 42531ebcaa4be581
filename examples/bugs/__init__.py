"""A zoo of real KL-gradient bugs: each module is a short loss function in biaslab's ``--loss`` contract
(``loss(batch) -> scalar`` for one group) reproducing a publicly reported problem, with ``REPORT`` (where it was
reported), ``BETA`` (the KL coefficient inside), ``AGG`` (its aggregation) and ``FIX`` (the one-line fix).
``tests/test_bugs.py`` audits every entry and asserts its verdict."""
