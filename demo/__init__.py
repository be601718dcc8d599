"""A runnable walk-through of the relay: ``python -m demo`` (see ``demo/__main__.py``)."""
