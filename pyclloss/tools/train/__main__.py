import sys

from pyclloss.tools.train.cli import main

sys.exit(main())
