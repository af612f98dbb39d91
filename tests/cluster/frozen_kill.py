"""`ecsnap agent …` that dies by SIGKILL in the middle of a live snapshot's freeze window:
as soon as the guest agent's guest-fsfreeze-freeze has returned, before the snapshots are
taken and the guest thawed (tests/cluster/test_cluster_vm.py runs it: `python
tests/cluster/frozen_kill.py agent --host-id h1 …`)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from ecsnap.adapters.compute.qemu.agent import AgentSession

_call = AgentSession.call


def _killed_when_frozen(self: AgentSession, name: str, *args: Any, **kwargs: Any) -> Any:
    result = _call(self, name, *args, **kwargs)
    if name == "guest-fsfreeze-freeze":
        print("SIGKILL with the guest frozen (guest-fsfreeze-freeze returned)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return result


setattr(AgentSession, "call", _killed_when_frozen)  # noqa: B010 (a method replaced)

if __name__ == "__main__":
    from ecsnap.entrypoints.cli.main import main

    sys.argv[0] = "ecsnap"
    main()
