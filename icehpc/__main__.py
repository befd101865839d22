"""``python -m icehpc STAGE ...`` = ``icehpc STAGE ...``."""
import sys

from .run.cli import main

sys.exit(main())
