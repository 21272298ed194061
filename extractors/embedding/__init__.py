"""extractors.embedding: from images to vectors: sources, decoding, backbones, the embed
loop and the engines that run it."""
