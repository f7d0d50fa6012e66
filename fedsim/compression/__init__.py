"""Compressed client updates: ComPEFT (Yadav et al., arXiv:2311.13171) and its baselines.

`compress` applies a method's rule (`methods`), `encode`/`decode` carry the result as bytes
(`codec`, positions coded by `positions`; the receiver decodes against the layout it expects,
`layout_of(adapter)`), and `residual` is the client's error feedback.
"""

from fedsim.compression.codec import (
    Header,
    Layout,
    decode,
    encode,
    encoded_size,
    layout_fingerprint,
    layout_of,
    read_header,
)
from fedsim.compression.errors import CodecError
from fedsim.compression.methods import (
    MAX_NUMEL,
    CodecConfig,
    Sparse,
    Update,
    codec_config,
    compress,
    residual,
    sparsify,
)

__all__ = [
    "MAX_NUMEL",
    "CodecConfig",
    "CodecError",
    "Header",
    "Layout",
    "Sparse",
    "Update",
    "codec_config",
    "compress",
    "decode",
    "encode",
    "encoded_size",
    "layout_fingerprint",
    "layout_of",
    "read_header",
    "residual",
    "sparsify",
]
