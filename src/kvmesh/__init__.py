"""kvmesh: a KV-cache layer for LLM serving engines (see docs and DESIGN.md)."""

__version__ = "0.1.0"
