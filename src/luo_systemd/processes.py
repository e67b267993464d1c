"""The one place luo-systemd runs child processes: each with a timeout, killed and reaped when it runs out
(a hung systemctl must not stay behind, nor hold luod's event loop)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence


class ChildFailed(Exception):
    """The child could not be started, failed, or ran out of time (and was killed and reaped)."""


async def output_of(argv: Sequence[str], timeout: float) -> str:
    """The standard output of ``argv``, for luod's event loop."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
    except OSError as e:
        raise ChildFailed(f"{argv[0]}: {e.strerror}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise ChildFailed(f"{argv[0]} did not finish in {timeout:g}s (killed)") from None
    if proc.returncode != 0:
        raise ChildFailed(f"{argv[0]} failed with status {proc.returncode}")
    return out.decode(errors="replace")


def run(argv: Sequence[str], timeout: float) -> None:
    """Runs ``argv`` to completion, for command-line tools (subprocess kills and reaps it on timeout)."""
    try:
        subprocess.run(list(argv), check=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        raise ChildFailed(str(e)) from None
