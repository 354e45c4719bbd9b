"""Adapters between serving engines and kvmesh's own API."""
