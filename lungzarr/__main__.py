"""``python -m lungzarr``: the command line (:mod:`lungzarr.cli`)."""
from lungzarr.cli import app

app(prog_name="lungzarr")
