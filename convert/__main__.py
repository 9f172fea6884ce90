import sys

from m3ddm_jax.interop.cli import main

sys.exit(main())
