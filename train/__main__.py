"""`python -m train` (see train/run.py, and --help)."""

import sys

from train.run import main

sys.exit(main())
