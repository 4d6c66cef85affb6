"""python -m workers: the same as `b24rebind worker`."""
import sys

from app.cli.main import main

sys.exit(main(["worker"]))
