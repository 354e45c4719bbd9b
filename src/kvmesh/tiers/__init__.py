"""Where entries live: L1 in shared memory (``memory``, ``arena``, ``shm``), disk (``disk``), Redis (``redis``).

Every tier below L1 speaks the batch-first protocol of ``base.Tier`` and is built from its own section of
``config.py``.
"""
