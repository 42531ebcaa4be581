"""Loss functions built from the installed frameworks' own functions (verl, OpenRLHF), in the ``--loss`` contract."""
