"""The command line: ``main`` (``main.py``), the shared flags (``flags.py``) and one module per subcommand
(``table``, ``figures``, ``check``, ``audit``, ``llm``, ``train``). Nothing in the library imports this package."""

from .main import main

__all__ = ["main"]
