import sys

from dissect.cli import main

sys.exit(main())
