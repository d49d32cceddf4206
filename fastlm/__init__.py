"""fastlm: C-accelerated packing, masking and DeepSpeed training for language models.

Importing fastlm stays light: torch, transformers and deepspeed load only where they are used.
"""
from fastlm.packing import BlockIndex, PackedDocuments, group_texts, pack_blocks, pack_documents

__all__ = ["BlockIndex", "PackedDocuments", "group_texts", "pack_blocks", "pack_documents"]
__version__ = "0.1.0"
