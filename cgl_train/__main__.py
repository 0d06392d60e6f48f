"""`python -m cgl_train` (also what torchrun runs): the `cgl-train` CLI."""
import sys

from cgl_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
