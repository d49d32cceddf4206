# The token dtypes fastlm stores and reads: uint16 for vocabularies below 65536 ids,
# uint32 above, and the signed ints that tokenizers and torch hand out.
from libc.stdint cimport uint16_t, uint32_t, int32_t, int64_t

ctypedef fused token_t:
    uint16_t
    uint32_t
    int32_t
    int64_t
