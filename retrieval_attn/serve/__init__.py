"""``retrieval-attn serve``: an OpenAI-compatible HTTP server whose conversations keep their KV offloaded
and reused across requests.

``protocol``: OpenAI's request fields checked, its error object and response bodies; ``pool``: the
kept conversations (a ``RetrievalCache`` each, keyed by the tokens it holds), dropped least recently
used when the memory plan of the next one would not fit; ``scheduler``: one thread per request, the
model's forward passes taken in turns (interleaved across requests, or first come first served);
``service``: admission (every refusal decided before model work) and statistics; ``app``: the
FastAPI app. Sits on ``hf`` (``RetrievalCache``, ``Decoder``) and the planner; the CLI's ``serve``
runs it with uvicorn. Prints nothing.

The names are loaded on first use (PEP 562): ``SCHEDULES`` (for the CLI's flags) loads neither FastAPI
nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

__all__ = [
    "APIError", "Conversation", "ConversationPool", "GenerationRequest", "Job", "Outcome", "PoolFull", "SCHEDULES",
    "Scheduler", "ServeSettings", "Service", "Turns", "create_app",
]

_WHERE = {"create_app": "app", "Conversation": "pool", "ConversationPool": "pool", "PoolFull": "pool",
          "APIError": "protocol", "GenerationRequest": "protocol", "Outcome": "protocol", "SCHEDULES": "scheduler",
          "Job": "scheduler", "Scheduler": "scheduler", "Turns": "scheduler", "ServeSettings": "service",
          "Service": "service"}

if TYPE_CHECKING:
    from .app import create_app
    from .pool import Conversation, ConversationPool, PoolFull
    from .protocol import APIError, GenerationRequest, Outcome
    from .scheduler import SCHEDULES, Job, Scheduler, Turns
    from .service import ServeSettings, Service


__getattr__ = lazy_names(__name__, _WHERE, globals())
