"""The tiered store: L1 in shared memory in front of disk and Redis (see ``tiered``)."""

from kvmesh.store.leases import LeaseTable
from kvmesh.store.partials import PartialIndex
from kvmesh.store.tiered import TieredStore
from kvmesh.store.types import Located, LowerTier, StoreObserver

__all__ = ["LeaseTable", "Located", "LowerTier", "PartialIndex", "StoreObserver", "TieredStore"]
