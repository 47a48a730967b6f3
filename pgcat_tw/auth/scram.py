"""SCRAM-SHA-256 towards servers (sans-IO; scramp does the maths)."""

import scramp

MECHANISM = "SCRAM-SHA-256"


class ScramClientExchange:
    """Drives the client side of a SCRAM-SHA-256 exchange.

    ``start(mechanisms)`` -> (mechanism, client-first bytes);
    ``server_first(data)`` -> client-final bytes; ``server_final(data)`` checks
    the server signature (raises on mismatch).
    """

    def __init__(self, user, password):
        self._user = user
        self._password = password
        self._client = None

    def start(self, mechanisms):
        if MECHANISM not in mechanisms:
            raise ValueError(f"server offers no supported SASL mechanism: {mechanisms}")
        self._client = scramp.ScramClient([MECHANISM], self._user, self._password)
        return MECHANISM, self._client.get_client_first().encode("utf-8")

    def server_first(self, data):
        self._client.set_server_first(bytes(data).decode("utf-8"))
        return self._client.get_client_final().encode("utf-8")

    def server_final(self, data):
        self._client.set_server_final(bytes(data).decode("utf-8"))
