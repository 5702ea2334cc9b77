"""The `s3proc` command (`commands.py`, a module per subcommand), its dev launcher (`dev.py`),
the embedded servers it starts (`embedded.py`, through `processes.py`) and the check for any a test run left
running (`leftovers.py`): tooling around the code location, never imported by it."""

from s3proc_dagster.cli.commands import main

__all__ = ["main"]
