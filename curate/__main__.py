"""`python -m curate ...` is the `curate` command."""

from curate.cli.main import entry

if __name__ == "__main__":
    entry()
