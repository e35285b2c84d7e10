"""mel: multimodal entity linking (GEMEL and DIM) on a shared data model, KB and evaluation harness."""
from .errors import CheckpointError, DatasetFormatError, InputError, KBError, MELError, ModelUnavailableError
from .types import NIL, Candidate, Entity, Example, LinkResult, Mention

__all__ = [
    "NIL", "Candidate", "CheckpointError", "DatasetFormatError", "Entity", "Example", "InputError", "KBError",
    "LinkResult", "MELError", "Mention", "ModelUnavailableError",
]
__version__ = "0.1.0"
