"""LongReward: four judge pipelines and their aggregation into a TRL reward function."""

from .config import DIMENSIONS, LongRewardConfig
from .function import Judgement, LongRewardFunction
from .inputs import Sample
from .retrieval import BM25Retriever, EmbeddingRetriever, OpenAIEmbedder, SentenceTransformerEmbedder, TokenChunker

__all__ = [
    "DIMENSIONS",
    "BM25Retriever",
    "EmbeddingRetriever",
    "Judgement",
    "LongRewardConfig",
    "LongRewardFunction",
    "OpenAIEmbedder",
    "Sample",
    "SentenceTransformerEmbedder",
    "TokenChunker",
]
