"""The ``embedstore`` command line (installed as ``embedstore.cli``): thin typer commands over the
library; ``embedstore.cli.app:main`` is the console entry point."""

__all__ = ["app", "progress", "render"]
