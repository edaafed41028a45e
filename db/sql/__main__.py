"""`python -m db.sql`: print a version of a view or function, or write the next one's diff."""

import sys

from db.sql import main

sys.exit(main(sys.argv[1:]))
