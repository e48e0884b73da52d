import sys

from distgraft.cli import main

sys.exit(main())
