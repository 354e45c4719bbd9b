"""Workloads, runners and reports for measuring engines with and without kvmesh."""
