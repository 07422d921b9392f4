"""The engine: ``resolve()`` decides how mail to a domain must travel; ``deliver()`` enforces it."""
