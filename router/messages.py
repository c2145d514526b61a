"""What the ingress sends to a replica and what comes back, per request of a dispatched batch.

Plain frozen dataclasses (picklable by Ray): the ingress has already validated and tokenized, so
the replica only admits requests into its engine and streams their increments back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flora_core.request_output import RequestOutput
from flora_core.sampling_params import SamplingParams


Recipe = tuple[tuple[str, float], ...]  # a merged adapter's (component adapter name, weight) pairs


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as the catalog knows it: its name, version (bumped by every load) and, for a
    merge of adapters, its recipe (empty for an adapter folder)."""

    name: str
    version: int
    merged_from: Recipe = ()

    @property
    def key(self) -> str:
        """The name a replica's pool registers it under: a reload never reuses a stale entry."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ReplicaRequest:
    """One generation request, ready for an engine."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    adapter: Optional[AdapterRef]  # None: the base model
    whole_answer: bool = False  # the client takes only the finished answer: its replica sends the last output alone


@dataclass(frozen=True)
class ReplicaError:
    """Why a request failed on the replica, as the ingress reports it over HTTP."""

    status: int
    message: str
    type: str
    param: Optional[str] = None


@dataclass(frozen=True)
class ReplicaEvent:
    """One step's news for one request: an engine output, or the error that ended it."""

    output: Optional[RequestOutput] = None
    error: Optional[ReplicaError] = None

    @property
    def finished(self) -> bool:
        return self.error is not None or (self.output is not None and self.output.finished)
