"""The node daemon process: one per node and instance, owns L1 and serves engines over a Unix socket.

``service.py`` is transport only (typed messages in, store calls, typed replies out); what is cached and
for how long is the store's (``kvmesh.store``).  Run it with ``kvmesh daemon`` or ``python -m kvmesh.daemon``.
"""
