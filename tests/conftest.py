"""Suite-wide settings.

torch's intra-op threads spin-wait on the tiny tensors of these tests; on the 2-core CI machine
one thread is several times faster overall, so the suite pins torch to one thread.

The tests that stop a command with Ctrl-C (SIGINT) or a closed terminal (SIGHUP) send those
signals to child processes, which inherit an ignored signal: a suite started in the background
(`cmd &`, where the shell ignores SIGINT) or under nohup (SIGHUP) would see them ignored. The
suite starts its children with both signals as a terminal leaves them.
"""

import importlib.util
import signal

if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(1)

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
