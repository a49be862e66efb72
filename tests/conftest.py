"""Suite-wide settings.

torch's intra-op threads spin-wait on the tiny tensors of these tests; on the 2-core CI machine
one thread is several times faster overall, so the suite pins torch to one thread.
"""

import importlib.util

if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(1)
