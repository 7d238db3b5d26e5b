import sys

from taste.cli import main

sys.exit(main())
