import sys

from pyclloss.train.cli import main

sys.exit(main())
