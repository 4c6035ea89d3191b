"""Which healthy, unsaturated replica gets a request.

    least-load    fewest outstanding requests (router in-flight + replica running + waiting);
                  ties rotate, so an idle pool still spreads sequential requests
    round-robin   each replica in turn
    prefix-aware  rendezvous hashing of the prompt's first `prefix_chars` characters over the
                  healthy replicas: requests that share a prefix land on the same replica (whose
                  prefix cache then holds it), and a replica leaving or joining moves only its
                  own share of prefixes. If the chosen replica is saturated or carries more than
                  `max_imbalance` requests over the least loaded one, least-load decides instead.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from typing import Any

from shardserve.router.backends import Backend

POLICIES = ("least-load", "prefix-aware", "round-robin")


class Policy:
    needs_prefix = False

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Backend], key: str | None) -> Backend:
        raise NotImplementedError

    def _least_load(self, candidates: Sequence[Backend]) -> Backend:
        best = min(b.load for b in candidates)
        tied = [b for b in candidates if b.load == best]
        return tied[next(self._counter) % len(tied)]


class LeastLoad(Policy):
    def choose(self, candidates: Sequence[Backend], key: str | None) -> Backend:
        return self._least_load(candidates)


class RoundRobin(Policy):
    def choose(self, candidates: Sequence[Backend], key: str | None) -> Backend:
        ordered = sorted(candidates, key=lambda b: b.url)
        return ordered[next(self._counter) % len(ordered)]


class PrefixAware(Policy):
    needs_prefix = True

    def __init__(self, max_imbalance: float = 8.0) -> None:
        super().__init__()
        self.max_imbalance = max_imbalance

    def choose(self, candidates: Sequence[Backend], key: str | None) -> Backend:
        if not key:
            return self._least_load(candidates)
        target = max(candidates, key=lambda b: _score(key, b.url))
        if target.load - min(b.load for b in candidates) > self.max_imbalance:
            return self._least_load(candidates)
        return target


def _score(key: str, url: str) -> int:
    digest = hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def make_policy(name: str, max_imbalance: float = 8.0) -> Policy:
    if name == "least-load":
        return LeastLoad()
    if name == "round-robin":
        return RoundRobin()
    if name == "prefix-aware":
        return PrefixAware(max_imbalance)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")


def prefix_key(path: str, body: bytes, prefix_chars: int) -> str | None:
    """The text a request's KV prefix is computed from, cut to `prefix_chars` characters:
    the prompt of /v1/completions (the first one of a list), or the chat messages in order."""
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    text: str | None = None
    if path.endswith("/chat/completions"):
        messages = payload.get("messages")
        if isinstance(messages, list):
            parts = []
            for m in messages:
                if not isinstance(m, dict):
                    continue
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                parts.append(f"{m.get('role', '')}\n{content or ''}\n")
            text = "".join(parts)
    else:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list):  # token ids
            text = ",".join(str(t) for t in prompt)
        elif isinstance(prompt, str):
            text = prompt
    return text[:prefix_chars] if text else None
