"""The CNI plugin served in-process: standalone mode, `python -m vpcni.cni.main`.

Reads the CNI environment and the config on stdin, prints the result or the
CNI error JSON on stdout. Logs go to the node's log file and, for warnings
and errors, to stderr; never to stdout.
"""

from __future__ import annotations

import logging
import os
import sys


def _quiet_pyroute2(record: logging.LogRecord) -> bool:
    """pyroute2 logs every netlink message at DEBUG (and resets its logger's
    level on import): keep its warnings only."""
    return record.levelno >= logging.WARNING or not record.name.startswith(("pyroute2", "asyncio"))


def setup_logging(node, stderr_level: int = logging.WARNING) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(stderr_level)
    stderr.setFormatter(logging.Formatter("vpcni: %(levelname)s %(message)s"))
    root.addHandler(stderr)
    stderr.addFilter(_quiet_pyroute2)
    if node is not None and node.logFile:
        try:
            node.logFile.parent.mkdir(parents=True, exist_ok=True)
            # Messages quote what callers sent, which may not be UTF-8 (an environment's
            # bytes arrive as surrogates): escaped, never a logging error on stderr.
            fh = logging.FileHandler(node.logFile, errors="backslashreplace")
        except OSError as exc:
            root.warning("cannot open log file %s: %s", node.logFile, exc)
        else:
            fh.setLevel(getattr(logging, node.logLevel))
            fh.addFilter(_quiet_pyroute2)
            fh.setFormatter(logging.Formatter(
                f"%(asctime)s {os.getpid()} %(levelname)s %(name)s: %(message)s"))
            root.addHandler(fh)


def serve(stdin: bytes) -> int:
    """Serve one CNI invocation in this process (standalone mode)."""
    from vpcni.core.config import NodeConfig
    from vpcni.core.errors import VpcniError

    from .plugin import Dispatcher

    node = None
    if os.environ.get("CNI_COMMAND") != "VERSION":
        try:
            node = NodeConfig.load()
        except VpcniError:
            node = None  # reported by the dispatcher below, as CNI error JSON
    setup_logging(node)
    dispatcher = Dispatcher(node)
    try:
        out, rc = dispatcher.run(os.environ, stdin)
    finally:
        dispatcher.close()
    if out:
        sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return rc


def main() -> int:
    from .plugin import MAX_STDIN

    # Never more than the largest config plus one byte (that one says "too large").
    return serve(sys.stdin.buffer.read(MAX_STDIN + 1))


if __name__ == "__main__":
    sys.exit(main())
