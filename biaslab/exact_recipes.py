"""Transitional names for the one exact engine (``biaslab.exact``): ``RecipeEngine`` / ``RecipeResult`` as the
audit used them (results' ``matches`` as a dict). To be removed once every caller uses ``biaslab.exact``."""

from __future__ import annotations

from .exact import DIRECTIONS, EnumerationTooLarge, ExactEngine, ExactResult

__all__ = ["DIRECTIONS", "EnumerationTooLarge", "RecipeEngine", "RecipeResult"]


class RecipeResult(ExactResult):
    matches = property(lambda self: self.info.matches)
    matched = property(lambda self: self.info.direction)


class RecipeEngine(ExactEngine):
    def truths(self):  # the four directions as a dict, as before
        tr = super().truths()
        return tr if not _AS_DICT else {k: v for k, v in tr.directions.items() if k != "zero"}

    def evaluate(self, config) -> RecipeResult:
        global _AS_DICT
        _AS_DICT = False
        try:
            r = super().evaluate(config)
        finally:
            _AS_DICT = True
        return RecipeResult(r.config, r.expected_grad, r.variance, r.nominal_scale, r.info)


_AS_DICT = True
