"""Edit records and the readers that map public editing datasets onto them."""

from .readers import FORMATS, EditDataError, detect_format, read_edits, write_edits
from .records import KINDS, EditRecord, EditRequest, LocalityPair, edit_requests

__all__ = [
    "FORMATS",
    "KINDS",
    "EditDataError",
    "EditRecord",
    "EditRequest",
    "LocalityPair",
    "detect_format",
    "edit_requests",
    "read_edits",
    "write_edits",
]
