"""Sparse Mixture-of-Experts layer: routers, dispatch implementations, experts."""

from stmoe.moe.layer import MoeAux, MoeLayer
from stmoe.moe.routing import RouterOutput

__all__ = ["MoeAux", "MoeLayer", "RouterOutput"]
