import sys

from cs336_systems.cli import main

sys.exit(main())
