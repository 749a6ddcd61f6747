"""ipm: Indexed Parametric Memory. Memories kept verbatim under semantic IDs; a LoRA adapter
on a small causal LM is the index; recall decodes an ID constrained to the IDs that exist."""

from .config import Config, Paths
from .engine import IPM, Answer, Hit, ImportResult, open
from .errors import (DuplicateID, HomeError, IndexDamaged, IndexMissing, InvalidID, InvalidInput, IPMError,
                     IPMWarning, ModelError, NotFound, TrainingError)
from .store import Memory

__version__ = "0.1.0"
__all__ = ["IPM", "Answer", "Config", "DuplicateID", "Hit", "HomeError", "ImportResult", "IndexDamaged",
           "IndexMissing", "InvalidID", "InvalidInput", "IPMError", "IPMWarning", "Memory", "ModelError", "NotFound", "Paths",
           "TrainingError", "open"]
