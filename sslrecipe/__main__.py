"""`python -m sslrecipe` (and `torchrun -m sslrecipe`): the same command line as `sslrecipe`."""

from sslrecipe.cli import main

main(prog_name="sslrecipe")
