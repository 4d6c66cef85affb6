"""Renamed `app.rebind.reading` (issue 23: two `facts.py` misled). A re-export until issue 22's
workers/tasks.py imports from there; then delete it."""
from app.rebind.reading import Echo as Echo
from app.rebind.reading import FactReader as FactReader
from app.rebind.reading import Gone as Gone
