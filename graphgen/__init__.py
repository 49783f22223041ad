"""graphgen: high-throughput LLM generation with offloading, as a graph compiled by passes."""

__all__ = ["LLM"]


def __getattr__(name):
    # lazy: executors import graphgen's submodules, and graphgen.api imports executors
    if name == "LLM":
        from .api import LLM

        return LLM
    raise AttributeError(f"module 'graphgen' has no attribute {name!r}")
