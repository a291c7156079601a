"""``python -m tunesmith``: the command line (the module torchrun starts for ``--nproc``)."""

from tunesmith.cli import entry

entry()
