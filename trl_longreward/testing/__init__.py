"""Tools for testing code that talks to a judge.

The main piece is `ScriptedOpenAIServer`, a real OpenAI-compatible HTTP server on loopback whose answers come from a
Python callable. Code under test reaches it through the real `openai` client, so transport behaviour (retries, rate
limits, timeouts, dropped connections, broken bodies) is exercised end to end without a model or a network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trl_longreward.testing.openai_server import ScriptedOpenAIServer

__all__ = ["ScriptedOpenAIServer"]


def __getattr__(name: str) -> Any:
    # Imported lazily so `python -m trl_longreward.testing.openai_server` does not load the module twice.
    if name == "ScriptedOpenAIServer":
        from trl_longreward.testing.openai_server import ScriptedOpenAIServer

        return ScriptedOpenAIServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
