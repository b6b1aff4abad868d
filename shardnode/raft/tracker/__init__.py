"""What a leader knows about each peer: progress, in-flight appends, votes."""

from .inflights import Inflights
from .progress import Progress, ProgressState
from .tracker import ProgressTracker

__all__ = ["Inflights", "Progress", "ProgressState", "ProgressTracker"]
