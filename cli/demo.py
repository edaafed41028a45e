"""`hps demo` (placeholder, written below)."""


def demo() -> None:
    """Try the platform in a browser."""
