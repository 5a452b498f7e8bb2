"""A judge behind any OpenAI-compatible chat endpoint: `vllm serve`, `transformers serve`, hosted APIs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from .base import ChatRequest, Judge, JudgeError


class OpenAIJudge(Judge):
    """Chat completions through the `openai` async client.

    Transport failures (429 honouring `Retry-After`, 5xx, timeouts, dropped connections) are retried by the client
    itself with exponential backoff, `max_retries` times; a call that still fails becomes a `JudgeError`, which the
    reward records as a missing dimension. At most `max_concurrency` calls are in flight per process.

    The API key is read from the environment variable `api_key_env` when the client is built and is held only by the
    client object: it is not an attribute of this judge, not part of `describe()`, not pickled.
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 32,
        timeout: float = 300.0,
        max_retries: int = 5,
        extra_body: dict | None = None,
    ) -> None:
        super().__init__()
        if not base_url:
            raise ValueError("OpenAIJudge needs base_url, e.g. http://127.0.0.1:8000/v1 (a `vllm serve` endpoint).")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        self.model_id = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.extra_body = extra_body
        self._client = None
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure_client(self):
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import openai

            # Local servers accept any key; a hosted API without its key fails with an authentication error that
            # names the variable (see `agenerate`).
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=os.environ.get(self.api_key_env) or "EMPTY",
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        return self._client

    async def _one(self, request: ChatRequest) -> str | JudgeError:
        import openai

        client = self._ensure_client()
        assert self._semaphore is not None
        async with self._semaphore:
            for retry in range(self.max_retries + 1):
                try:
                    completion = await client.chat.completions.create(
                        model=self.model_id,
                        messages=list(request.messages),
                        temperature=request.temperature,
                        top_p=request.top_p,
                        max_tokens=request.max_tokens,
                        extra_body=self.extra_body,
                    )
                    break
                except openai.AuthenticationError as err:
                    self.stats.add(requests=1, failures=1)
                    return JudgeError(f"Judge at {self.base_url} rejected the API key from ${self.api_key_env}: {err}")
                except ValueError as err:
                    # A 200 whose body is not JSON (a broken proxy): the client does not retry it, so we do.
                    if retry < self.max_retries:
                        await asyncio.sleep(min(0.5 * 2**retry, 8.0))
                        continue
                    self.stats.add(requests=1, failures=1)
                    return JudgeError(f"Judge at {self.base_url} kept answering malformed bodies: {err!r}")
                except Exception as err:  # a judge failure never crashes the caller: it becomes a missing score
                    self.stats.add(requests=1, failures=1)
                    return JudgeError(f"Judge call to {self.base_url} failed after {self.max_retries} retries: {err!r}")
        choices = getattr(completion, "choices", None)
        content = choices[0].message.content if choices else None
        if not isinstance(content, str):
            self.stats.add(requests=1, failures=1)
            return JudgeError(f"Judge at {self.base_url} returned no message content: {str(completion)[:200]!r}")
        usage = getattr(completion, "usage", None)
        self.stats.add(requests=1, completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
        return content

    async def agenerate(self, requests: Sequence[ChatRequest]) -> list[str | JudgeError]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def describe(self) -> dict[str, str]:
        return {"backend": "openai-compatible", "model": self.model_id, "base_url": self.base_url}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_client=None, _semaphore=None, _loop=None)
        return state
