"""extractors: image loading, sources, backbones, embedding, the store and its FAISS index."""

DEFAULT_BACKBONE = "efficientnet_lite0"  # offline default; see extractors.backbones
