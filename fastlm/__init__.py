"""fastlm: C-accelerated packing, masking and DeepSpeed training for language models.

Importing fastlm stays light: torch, transformers and deepspeed load only where they are used.
"""
from fastlm.packing import BlockIndex, PackedDocuments, group_texts, pack_blocks, pack_documents
# numpy-only modules; note `fastlm.prepare` is the function (the module: `from fastlm.prepare import ...`).
from fastlm.store import TokenStore, merge_stores
from fastlm.prepare import prepare
from fastlm.masking import Masker, mask_tokens
from fastlm.collators import DataCollatorForCLM, DataCollatorForLanguageModeling, DataCollatorForMLM

__all__ = ["BlockIndex", "PackedDocuments", "group_texts", "pack_blocks", "pack_documents",
           "TokenStore", "merge_stores", "prepare",
           "Masker", "mask_tokens", "DataCollatorForMLM", "DataCollatorForCLM", "DataCollatorForLanguageModeling"]
__version__ = "0.1.0"
