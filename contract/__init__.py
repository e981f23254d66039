"""
What the two halves agree on, and nothing more: socket paths, group names and the events
sent to them, the ticket store, and the channel layer class.

wsgi_site sends and mints, asgi_site listens and redeems; both import this package, and it
imports neither, so a Gunicorn worker never loads the socket stack to learn a group name.
tests/test_boundaries.py fails on any import that crosses.
"""
