"""Edit records and the readers that map public editing datasets onto them."""

from .readers import FORMATS, EditDataError, detect_format, read_edits, write_edits
from .records import KINDS, EditRecord, LocalityPair

__all__ = [
    "FORMATS",
    "KINDS",
    "EditDataError",
    "EditRecord",
    "LocalityPair",
    "detect_format",
    "read_edits",
    "write_edits",
]
