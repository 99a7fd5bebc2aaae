"""The compactor: folds a deltalog log into ChromaDB snapshots.

``Compactor(config).run_once()`` applies what is new since the committed
high-water mark under a fenced lease; ``rebuild`` replays from scratch;
``verify`` proves that a rebuild equals the committed snapshot.
"""

from compactor.replay import Limits, Progress
from compactor.runner import CompactionResult, Compactor, RebuildResult
from compactor.verify import VerifyResult

__all__ = [
    "CompactionResult",
    "Compactor",
    "Limits",
    "Progress",
    "RebuildResult",
    "VerifyResult",
]
