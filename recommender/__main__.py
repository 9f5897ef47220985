"""``python -m recommender``: the command line (see ``recommender.cli``)."""

import sys

from recommender.cli import main

sys.exit(main())
