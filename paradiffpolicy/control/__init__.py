"""Closing the loop: agents (a call to a policy in-process, in a worker process or on a server),
joins of a new chunk to the executing one, ``PolicyRunner`` for a robot program, and the ``fast``,
``delay`` and ``realtime`` episode loops of ``eval``."""
