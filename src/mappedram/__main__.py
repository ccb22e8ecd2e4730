import sys

from mappedram.cli import main

sys.exit(main())
