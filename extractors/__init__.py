"""extractors: image loading, sources, backbones, embedding, the store and its FAISS index."""

import os
from pathlib import Path

DEFAULT_BACKBONE = "efficientnet_lite0"  # offline default; see extractors.embedding.backbones
DEFAULT_WORKSPACE = Path(os.environ.get("HEADSTART_HOME", "data"))  # stores, finetuned/, MLflow
