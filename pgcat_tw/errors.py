"""Exceptions that carry a SQLSTATE and severity, and how they become ErrorResponses.

L0: no Twisted imports.
"""


class PgError(Exception):
    """An error that a client is told about with an ErrorResponse.

    ``fatal`` errors are sent with severity FATAL and the client connection
    is closed afterwards.
    """

    sqlstate = "XX000"
    severity = "ERROR"

    def __init__(self, message, sqlstate=None, severity=None, detail=None, hint=None):
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate
        if severity is not None:
            self.severity = severity
        self.detail = detail
        self.hint = hint

    @property
    def fatal(self):
        return self.severity in ("FATAL", "PANIC")

    def to_message(self):
        from pgcat_tw.protocol.messages import error_response

        return error_response(
            self.severity, self.sqlstate, self.message, detail=self.detail, hint=self.hint
        )


class ProtocolViolation(PgError):
    """The peer broke the wire protocol (08P01); the connection is closed."""

    sqlstate = "08P01"
    severity = "FATAL"


class AuthenticationFailed(PgError):
    sqlstate = "28P01"
    severity = "FATAL"


class InvalidAuthorization(PgError):
    sqlstate = "28000"
    severity = "FATAL"


class UnknownDatabase(PgError):
    sqlstate = "3D000"
    severity = "FATAL"


class ServerConnectionFailed(PgError):
    """A server connection could not be made, or died (08006)."""

    sqlstate = "08006"


class PoolTimeout(PgError):
    """No server connection became free within connect_timeout (53300)."""

    sqlstate = "53300"


class ServerError(PgError):
    """An ErrorResponse received from PostgreSQL, kept with its own fields."""

    def __init__(self, fields):
        self.fields = fields
        super().__init__(
            fields.get("M", "server error"),
            sqlstate=fields.get("C", "XX000"),
            severity=fields.get("V", fields.get("S", "ERROR")),
            detail=fields.get("D"),
            hint=fields.get("H"),
        )
