"""``kerasnuc data``: dataset import and inspection."""

from __future__ import annotations

import click


@click.group()
def data() -> None:
    """Import datasets into the kerasnuc layout and inspect them."""
