"""`ivf-distill build` as a script run from a checkout (e.g. by `ray job submit --working-dir .`):
python jobs/distill.py --help. The command lives in pipeline/cli/build.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli.build import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(exit_on_interrupt=True))
