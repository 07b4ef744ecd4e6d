import sys

from attnpack.cli import main


sys.exit(main())
