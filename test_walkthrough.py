"""
The guided tour (walkthrough.py) runs as a script, offline on a CPU, and prints each part of
one AMFT step.
"""
import os
import re
import subprocess
import sys

from conftest import HERE


def test_walkthrough_runs_and_its_three_estimators_agree():
    script = os.path.join(HERE, "walkthrough.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=HERE)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for part in ("SFT loss", "advantages", "g_RL: norm", "g_SFT: norm", "H* =", "mu: 0.8 ->",
                 "one step taken"):
        assert part in out, part
    dU = {name: float(v) for name, v in re.findall(r"dU/dmu by (\S+)\s*: ([-+0-9.e]+)", out)}
    assert set(dU) == {"first-order", "autograd", "fd"}
    if dU["autograd"] != 0:  # the exact estimate and its finite difference agree
        assert abs(dU["fd"] - dU["autograd"]) <= 0.02 * abs(dU["autograd"])
