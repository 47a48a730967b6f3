"""The client side of the pooler (L2).

- ``startup``: the startup phase (SSLRequest/TLS, direct TLS, GSSENC,
  CancelRequest, protocol version); a ``Startup`` object per connection.
- ``login``: pool lookup, authentication and the greeting; a ``Login``
  object per connection. Both are dropped after the greeting.
- ``session``: the ``Session`` record they hand to the work phase.
- ``client``: ``ClientProtocol`` (the connection; its work phase holds the
  relay's hot path: scan, forward, the fast checkout, bind, release, a
  server that dies) and ``ClientFactory``.
- ``checkout``: the checkout's slow path (queueing, health checks,
  parameter sync, failures and the next candidate).
- ``commands``: the SQL the pooler answers itself.

Resetting a server between clients is the server connection's business
(``backend.ServerConnection.reset_query``/``reset_and_release``/``client_left``).
"""

from pgcat_tw.frontend.client import (  # noqa: F401
    HOLD_LIMIT,
    LOGIN_TIMEOUT,
    REQUEST_KEEP_LIMIT,
    ClientFactory,
    ClientProtocol,
)
from pgcat_tw.frontend.session import Session  # noqa: F401

__all__ = ["ClientFactory", "ClientProtocol", "Session", "HOLD_LIMIT", "LOGIN_TIMEOUT",
           "REQUEST_KEEP_LIMIT"]
