"""The three separately loadable modules of a pipeline: video encoder, text decoder, embedder."""
from .decoder import TextDecoder
from .embedder import SentenceEmbedder
from .encoder import Encoded, VideoEncoder

__all__ = ["Encoded", "SentenceEmbedder", "TextDecoder", "VideoEncoder"]
