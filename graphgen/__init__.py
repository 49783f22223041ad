"""graphgen: high-throughput LLM generation with offloading, as a graph compiled by passes."""

__all__ = ["LLM"]


def __getattr__(name):
    # lazy: `import graphgen.config` (what passes/ and executors/ need of the core) must not load the
    # product surface (api -> executors, passes, scipy); LLM is imported on first use
    if name == "LLM":
        from .api import LLM

        return LLM
    raise AttributeError(f"module 'graphgen' has no attribute {name!r}")
