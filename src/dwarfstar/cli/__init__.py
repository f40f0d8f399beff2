"""The ``ds4`` command."""
