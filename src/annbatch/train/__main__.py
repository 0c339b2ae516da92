"""``python -m annbatch.train [overrides]``: the same as ``annbatch train [overrides]``.

Lightning's DDP launcher starts the other processes by running this file again (see
:func:`annbatch.train.main`), so it must also work when run as a plain script.
"""

import os
import sys

if (
    not __package__
    and sys.path
    and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__))
):
    # Run by path: don't let this folder's modules shadow top-level ones.
    del sys.path[0]

from annbatch.train import main

if __name__ == "__main__":
    raise SystemExit(main())
