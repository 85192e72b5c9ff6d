"""Typed errors of the engine: each carries a message a user can act on."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidInputError(EngineError, ValueError):
    """An argument has the wrong shape, dtype, range or value (NaN features, k too large...)."""


class EmptyGalleryError(InvalidInputError):
    """A gallery has no usable images or features."""


class InvalidImageError(InvalidInputError):
    """A file is not a decodable image (zero bytes, truncated, not an image, too large)."""


class UnsafePathError(InvalidInputError):
    """A path escapes the folder it must stay in."""


class TooLargeError(InvalidInputError):
    """The work asked for cannot run at this size on this machine (memory or time); the
    message says the limit and what to do instead."""


class NotFittedError(EngineError, RuntimeError):
    """A re-ranker was used before `fit` gave it a gallery."""


class UnknownNameError(EngineError, KeyError):
    """A name (re-ranker, backbone, protocol) is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(EngineError, ImportError):
    """An optional package is needed for this feature; the message says what to install."""


class CacheError(EngineError, RuntimeError):
    """A cache file is missing, corrupt or was made from other inputs; it will be rebuilt."""


class JobCancelled(EngineError, RuntimeError):
    """A job was cancelled while it ran: raised from its progress callback at its next report,
    so that the work stops there (what it saved before, such as a checkpoint, stays valid)."""
