import sys

from softcache._cli.main import main

sys.exit(main())
