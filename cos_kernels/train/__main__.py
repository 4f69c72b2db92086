"""python -m cos_kernels.train {pretrain,finetune} [options]"""

import sys

from .cli import main

sys.exit(main())
