"""Data: conversation records, converters and collation."""

from vlm_fo1.data.records import (
    ConversationRecord,
    pack_conversations,
    read_records,
    text_to_items,
    write_records,
)

__all__ = ["ConversationRecord", "pack_conversations", "read_records", "text_to_items", "write_records"]
