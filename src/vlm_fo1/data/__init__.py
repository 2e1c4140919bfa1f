"""Data: conversation records, converters and collation."""

from vlm_fo1.data.records import ConversationRecord, read_records, text_to_items, write_records

__all__ = ["ConversationRecord", "read_records", "text_to_items", "write_records"]
