"""graphgen: high-throughput LLM generation with offloading, as a graph compiled by passes."""
from .api import LLM  # noqa: F401

__all__ = ["LLM"]
