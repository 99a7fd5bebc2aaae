import sys

from deltalog.cli import main

sys.exit(main())
