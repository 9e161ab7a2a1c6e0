"""python -m pipeline: the ivf-distill command (pipeline.cli)."""
import sys

from pipeline.cli import main

sys.exit(main())
