"""``atomkit serve``: resident sessions in a local service (server), the CLI's thin path and the Python client
(client), and the owner-only socket they talk over (protocol)."""
