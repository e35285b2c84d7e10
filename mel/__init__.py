"""mel: multimodal entity linking (GEMEL and DIM) on a shared data model, KB and evaluation harness."""
from .errors import MELError, InputError, DatasetFormatError, KBError, ModelUnavailableError, CheckpointError
from .types import Mention, Entity, Candidate, LinkResult, Example, NIL

__version__ = "0.1.0"
