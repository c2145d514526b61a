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
    """An adapter as the catalog knows it: its name, version (bumped by every load), for a merge of
    adapters its recipe (empty for an adapter folder), and the catalog start that numbered it."""

    name: str
    version: int
    merged_from: Recipe = ()
    incarnation: str = ""  # the catalog's start time (hex ns): versions restart at 1 with a new start

    @property
    def key(self) -> str:
        """The name a replica's pool registers it under: a reload, or a new catalog start, never reuses an entry."""
        return f"{self.name}@{self.incarnation}.{self.version}" if self.incarnation else f"{self.name}@{self.version}"

    @property
    def order(self) -> tuple[str, int]:
        """Sorts a name's refs oldest first: a later catalog start after an earlier one, then by version."""
        return self.incarnation, self.version


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
