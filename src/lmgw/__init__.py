"""lmgw: a low-latency gateway for disaggregated LLM serving."""

__version__ = "0.1.0"
