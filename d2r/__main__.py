import sys

from d2r.cli import main

sys.exit(main())
