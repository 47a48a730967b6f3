"""SQL-level prepared statement commands the pooler must see in transaction
mode: PREPARE and EXECUTE (refused there) and DEALLOCATE (answered for the
client's own view of its statements).

``match(buf, start, end)`` on a Query body -> (kind, argument) or None, with
kind "prepare" | "execute" | "deallocate" | "discard_all"; for "deallocate"
the argument is the statement name (bytes) or None for ALL. Anchored and allocation-free when
the query is anything else.
"""

import re

_PREFIX = re.compile(rb"\s*(?:prepare(?!\s+transaction\b)|execute|deallocate|discard)\b",
                     re.IGNORECASE)
_DISCARD_ALL = re.compile(rb"\s*discard\s+all\s*;?\s*\Z", re.IGNORECASE)
_DEALLOCATE = re.compile(
    rb'\s*deallocate\s+(?:prepare\s+)?(?:(all)|"((?:[^"]|"")+)"|([a-z_][a-z0-9_$]*))\s*;?\s*\Z',
    re.IGNORECASE)


def match(buf, start, end):
    mo = _PREFIX.match(buf, start, end)
    if mo is None:
        return None
    word = bytes(buf[mo.start():mo.end()]).strip().lower()
    if word in (b"prepare", b"execute"):
        return (word.decode(), None)
    text = bytes(buf[start:end - 1] if end > start and buf[end - 1] == 0 else buf[start:end])
    if word == b"discard":
        return ("discard_all", None) if _DISCARD_ALL.match(text) else None
    d = _DEALLOCATE.match(text)
    if d is None:
        return None  # something else (e.g. several statements): the server decides
    if d.group(1):
        return ("deallocate", None)
    if d.group(2):
        return ("deallocate", d.group(2).replace(b'""', b'"'))
    return ("deallocate", d.group(3).lower())
