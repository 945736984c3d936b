import sys

from pacsbridge.cli import main

sys.exit(main())
