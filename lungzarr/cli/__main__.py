"""``python -m lungzarr.cli``."""
from lungzarr.cli import app

app()
