"""Engines: one small module per capability, each the only place that touches its
library. Engines know nothing of HTTP. They report problems with the exceptions
below; the server's one error mapper (localai.py, "connection loop") turns them
into responses:

    BadInput     -> 400  the request is wrong (param names the field, if any)
    NotFound     -> 404  an unknown model or voice
    TooLarge     -> 413  an input over an engine limit
    Busy         -> 503  queue full; retry_after seconds go in Retry-After
    Unavailable  -> 503  the engine's package or model is missing

Blocking engine calls take an optional ``cancel`` (a ``threading.Event``): the
server sets it when the client has gone, and the engine stops at its next check
(between tokens, before starting queued work).
"""


class EngineError(Exception):
    """Base of every error an engine reports on purpose."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadInput(EngineError):
    pass


class NotFound(EngineError):
    pass


class TooLarge(EngineError):
    pass


class Busy(EngineError):
    def __init__(self, message, retry_after=1):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(EngineError):
    pass
