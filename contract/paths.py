"""The socket paths Daphne serves, and the ones a ticket may be minted for."""

WHOAMI = "/ws/whoami/"
LIVE = "/ws/live/"
SOCKET_PATHS = (WHOAMI, LIVE)
