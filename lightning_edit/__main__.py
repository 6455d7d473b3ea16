"""`python -m lightning_edit run edit|sae|transcoder key=value ...`"""

import sys

from lightning_edit.cli import main

sys.exit(main())
