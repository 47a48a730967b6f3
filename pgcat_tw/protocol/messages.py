"""Codecs for the messages the pooler inspects or synthesizes.

Everything else passes through the relay untouched and is never decoded.
L0: pure functions over bytes.
"""

import struct

from pgcat_tw.protocol import codes

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")
_I32_PAIR = struct.Struct("!ii")


def _msg(type_byte, body):
    return type_byte + _I32.pack(len(body) + 4) + body


def cstr(value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    if b"\x00" in value:
        raise ValueError("NUL byte in protocol string")
    return value + b"\x00"


# --- backend messages (pooler -> client) -----------------------------------

def error_response(severity, sqlstate, message, detail=None, hint=None, notice=False):
    fields = [b"S", cstr(severity), b"V", cstr(severity), b"C", cstr(sqlstate),
              b"M", cstr(message)]
    if detail:
        fields += [b"D", cstr(detail)]
    if hint:
        fields += [b"H", cstr(hint)]
    fields.append(b"\x00")
    return _msg(b"N" if notice else b"E", b"".join(fields))


def notice_response(message, sqlstate="00000", severity="NOTICE", detail=None):
    return error_response(severity, sqlstate, message, detail=detail, notice=True)


def authentication(code, extra=b""):
    return _msg(b"R", _I32.pack(code) + extra)


def auth_ok():
    return authentication(codes.AUTH_OK)


def auth_md5(salt):
    return authentication(codes.AUTH_MD5, salt)


def auth_cleartext():
    return authentication(codes.AUTH_CLEARTEXT)


def auth_sasl(mechanisms):
    return authentication(codes.AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data):
    return authentication(codes.AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data):
    return authentication(codes.AUTH_SASL_FINAL, data)


def parameter_status(name, value):
    return _msg(b"S", cstr(name) + cstr(value))


def backend_key_data(pid, secret):
    return _msg(b"K", _I32_PAIR.pack(pid, secret))


READY_IDLE = _msg(b"Z", b"I")
PARSE_COMPLETE = _msg(b"1", b"")
BIND_COMPLETE = _msg(b"2", b"")
NO_DATA = _msg(b"n", b"")
READY_IN_TX = _msg(b"Z", b"T")
READY_FAILED = _msg(b"Z", b"E")


def ready_for_query(status=b"I"):
    return _msg(b"Z", status)


def command_complete(tag):
    return _msg(b"C", cstr(tag))


def row_description(columns):
    """columns: sequence of (name, type_oid); text format."""
    parts = [struct.pack("!h", len(columns))]
    for name, oid in columns:
        parts.append(cstr(name) + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0))
    return _msg(b"T", b"".join(parts))


def data_row(values):
    parts = [struct.pack("!h", len(values))]
    for v in values:
        if v is None:
            parts.append(_I32.pack(-1))
        else:
            if isinstance(v, str):
                v = v.encode("utf-8")
            parts.append(_I32.pack(len(v)) + v)
    return _msg(b"D", b"".join(parts))


# --- frontend messages (pooler -> server) ----------------------------------

def startup_message(params, version=codes.PROTOCOL_3_0):
    body = _I32.pack(version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request():
    return _I32_PAIR.pack(8, codes.SSL_REQUEST)


def cancel_request(pid, secret):
    return _I32.pack(16) + _I32.pack(codes.CANCEL_REQUEST) + _I32_PAIR.pack(pid, secret)


def password_message(data):
    return _msg(b"p", data)


def sasl_initial_response(mechanism, data):
    return _msg(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data):
    return _msg(b"p", data)


def query(sql):
    return _msg(b"Q", cstr(sql))


def extended_query(sql, params=()):
    """Parse (unnamed, types inferred) + Bind (text parameters, None for NULL)
    + Execute + Sync: one statement with bound parameters."""
    parse = cstr("") + cstr(sql) + struct.pack("!h", 0)
    bind = [cstr(""), cstr(""), struct.pack("!hh", 0, len(params))]
    for p in params:
        if p is None:
            bind.append(_I32.pack(-1))
        else:
            p = p.encode("utf-8") if isinstance(p, str) else p
            bind.append(_I32.pack(len(p)) + p)
    bind.append(struct.pack("!h", 0))
    return (_msg(b"P", parse) + _msg(b"B", b"".join(bind))
            + _msg(b"E", cstr("") + _I32.pack(0)) + _msg(b"S", b""))


TERMINATE = _msg(b"X", b"")
SYNC = _msg(b"S", b"")


# --- decoders ---------------------------------------------------------------

def parse_startup_params(body):
    """Key/value pairs of a StartupMessage body (after the version int)."""
    parts = body.split(b"\x00")
    # The list ends with b"" (terminating NUL) and b"" (trailing split).
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ValueError("startup packet parameters are not NUL terminated")
    items = parts[:-2]
    if len(items) % 2:
        raise ValueError("startup packet has a name without a value")
    params = {}
    for i in range(0, len(items), 2):
        name = items[i].decode("utf-8")
        if not name:
            raise ValueError("empty parameter name in startup packet")
        params[name] = items[i + 1].decode("utf-8")
    return params


def parse_error_fields(body):
    """ErrorResponse/NoticeResponse body -> {field code: text}."""
    fields = {}
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        code = chr(body[pos])
        end = body.index(b"\x00", pos + 1)
        fields[code] = bytes(body[pos + 1:end]).decode("utf-8", "replace")
        pos = end + 1
    return fields


def parse_parameter_status(body):
    name, value, _ = bytes(body).split(b"\x00", 2)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_sasl_mechanisms(data):
    return [m.decode("ascii") for m in bytes(data).split(b"\x00") if m]


def parse_sasl_initial_response(body):
    """SASLInitialResponse body -> (mechanism, initial data or None)."""
    end = body.index(b"\x00")
    mech = bytes(body[:end]).decode("ascii")
    (length,) = _I32.unpack_from(body, end + 1)
    data = None if length == -1 else bytes(body[end + 5:end + 5 + length])
    return mech, data
