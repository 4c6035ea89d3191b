"""Typed errors: each says what is wrong and what to change.

The CLI prints `str(err)` as one line and exits non-zero; the server maps each class to an
OpenAI-style error JSON and an HTTP status.
"""

from __future__ import annotations


class ShardserveError(Exception):
    """Base of every error shardserve raises on purpose."""

    http_status = 500
    error_type = "internal_error"
    error_code: str | None = None  # the error JSON's code where OpenAI has one for the case

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(ShardserveError, ValueError):
    """A request field is missing, malformed or out of range."""

    http_status = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit max_model_len."""

    error_code = "context_length_exceeded"  # OpenAI's, which clients check to trim and retry


class ModelLoadError(ShardserveError):
    """The model path is missing, holds no model, or holds one we cannot serve."""

    error_type = "model_load_error"


class UnsupportedModelError(ModelLoadError):
    """The architecture or tensor type is not supported."""


class CacheTooSmallError(ShardserveError):
    """The KV cache cannot hold one sequence of max_model_len."""

    error_type = "cache_too_small"


class EngineDeadError(ShardserveError):
    """The engine (or one of its workers) died; requests in flight cannot finish."""

    http_status = 503
    error_type = "engine_dead"


class RendezvousTimeoutError(ShardserveError):
    """Not every rank of a multi-process (or multi-node) world checked in within the
    rendezvous timeout; the message names the missing ranks and nodes."""

    http_status = 503
    error_type = "rendezvous_timeout"


class OverloadedError(ShardserveError):
    """The waiting queue is full; the client should retry later."""

    http_status = 503
    error_type = "overloaded"
