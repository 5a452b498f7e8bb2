"""Chunking and retrieval: chunks tile the text, sizes are in tokens, top-k comes back in document order."""

import numpy as np
import pytest

from trl_longreward.reward.retrieval import (
    BM25Retriever,
    Embedder,
    EmbeddingRetriever,
    OpenAIEmbedder,
    RetrievalIndex,
    SentenceTransformerEmbedder,
    TokenChunker,
)
from trl_longreward.testing.openai_server import ScriptedOpenAIServer

TEXT = "The valley floods in spring. The council built a barrier in 1998! Farmers planted willows, then oaks."


def test_regex_chunks_tile_the_text_and_hold_n_tokens():
    chunker = TokenChunker()
    chunks = chunker.split(TEXT, 4)
    assert "".join(chunks) == TEXT  # nothing lost, nothing re-spelled
    counts = [chunker.count_tokens(c) for c in chunks]
    assert all(c == 4 for c in counts[:-1]) and 1 <= counts[-1] <= 4
    assert len(chunks) == -(-chunker.count_tokens(TEXT) // 4)


def test_cjk_characters_are_tokens_and_chunks_tile_mixed_script_text():
    text = "北京是中国的首都。Beijing is the capital of China. 東京は日本の首都です。"
    chunker = TokenChunker()
    assert chunker.count_tokens("北京是中国") == 5
    chunks = chunker.split(text, 6)
    assert "".join(chunks) == text
    assert chunks[0] == "北京是中国的"


def test_hf_tokenizer_chunking_uses_its_offsets():
    from transformers import AutoTokenizer

    from trl_longreward.reward.retrieval import default_embedding_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_embedding_model_path())
    chunker = TokenChunker(tokenizer)
    chunks = chunker.split(TEXT * 5, 16)
    assert "".join(chunks) == TEXT * 5
    assert [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks[:-1]] == [16] * (len(chunks) - 1)


def test_empty_and_invalid_inputs():
    chunker = TokenChunker()
    assert chunker.split("   ", 8) == []
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunker.split(TEXT, 0)


class _FixedIndex(RetrievalIndex):
    def __init__(self, chunks, scores):
        super().__init__(chunks)
        self._scores = np.asarray(scores, dtype=np.float32)

    def scores(self, queries):
        return np.repeat(self._scores[None, :], len(queries), axis=0)


def test_top_k_returns_document_order_not_score_order():
    index = _FixedIndex([f"c{i}" for i in range(8)], [0.1, 0.9, 0.2, 0.8, 0.0, 0.7, 0.95, 0.3])
    assert index.top_k(["q"], 3) == [[1, 3, 6]]  # best three are 6, 1, 3; shown in document order


def test_top_k_ties_prefer_earlier_chunks_and_small_documents_return_everything():
    index = _FixedIndex([f"c{i}" for i in range(6)], [0.5] * 6)
    assert index.top_k(["q", "r"], 2) == [[0, 1], [0, 1]]
    small = _FixedIndex(["a", "b"], [0.1, 0.2])
    assert small.top_k(["q"], 5) == [[0, 1]]


def test_bm25_finds_the_lexically_matching_chunk_including_cjk():
    chunks = [
        "the barrier was built in 1998",
        "willows and oaks were planted",
        "北京是中国的首都",
        "floods every spring",
    ]
    index = BM25Retriever().index(chunks)
    assert index.top_k(["when was the barrier built"], 1) == [[0]]
    assert index.top_k(["中国首都"], 1) == [[2]]


def test_bm25_query_without_index_tokens_matches_nothing_and_keeps_document_order():
    # A statement of stopwords or punctuation only ("It is.", "...") has no BM25 tokens; bm25s alone raises on it.
    chunks = ["the barrier was built in 1998", "willows and oaks were planted", "floods every spring"]
    index = BM25Retriever().index(chunks)
    scores = index.scores(["it is the one", "...", "oaks"])
    assert scores.shape == (3, 3)
    assert not scores[:2].any() and scores[2, 1] > 0
    assert index.top_k(["it is the one", "oaks", "!?"], 2) == [[0, 1], [0, 1], [0, 1]]


def test_sentence_transformer_embeddings_are_normalised_and_semantic():
    embedder = SentenceTransformerEmbedder()
    vectors = embedder.embed(["a cat sat on the mat", "stock markets fell sharply"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    index = EmbeddingRetriever(embedder).index(
        ["the kitten rested on a rug", "share prices dropped", "it rained", "a poem about the sea"]
    )
    assert index.top_k(["where did the cat sit", "finance news"], 1) == [[0], [1]]


class _CountingEmbedder(Embedder):
    name = "counting"

    def __init__(self):
        self.calls: list[int] = []

    def embed(self, texts):
        self.calls.append(len(texts))
        rng = np.random.default_rng(len(texts))
        vectors = rng.normal(size=(len(texts), 8)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_chunk_embeddings_are_computed_once_per_index():
    embedder = _CountingEmbedder()
    index = EmbeddingRetriever(embedder).index(["a", "b", "c", "d", "e", "f"])
    index.top_k(["q1", "q2"], 2)
    index.top_k(["q3"], 2)
    assert embedder.calls == [6, 2, 1]  # the six chunks once, then only the queries


def test_openai_embeddings_endpoint():
    def embed(texts):
        return [[1.0, float(len(t)), 0.0] for t in texts]

    with ScriptedOpenAIServer(lambda m, b: "", embedder=embed) as server:
        embedder = OpenAIEmbedder(server.base_url, "embed-model", batch_size=2)
        vectors = embedder.embed(["a", "bbb", "cc"])
    assert vectors.shape == (3, 3)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    expected = np.array([[1, 1, 0], [1, 3, 0], [1, 2, 0]], dtype=np.float32)
    assert np.allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)


def test_byte_level_tokens_sharing_a_character_never_make_empty_chunks():
    from transformers import AutoTokenizer

    from trl_longreward.models import default_model_path

    chunker = TokenChunker(AutoTokenizer.from_pretrained(default_model_path()))
    text = "子曰：学而时习之，不亦说乎？"
    chunks = chunker.split(text, 1)
    assert "".join(chunks) == text and all(chunks)
