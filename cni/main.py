"""The CNI plugin served in-process: standalone mode, `python -m vpcni.cni.main`.

Reads the CNI environment and the config on stdin, prints the result or the
CNI error JSON on stdout. Logs go to the node's log file and, for warnings
and errors, to stderr; never to stdout.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from datetime import datetime
from typing import Optional


def _quiet_pyroute2(record: logging.LogRecord) -> bool:
    """pyroute2 logs every netlink message at DEBUG (and resets its logger's
    level on import): keep its warnings only."""
    return record.levelno >= logging.WARNING or not record.name.startswith(("pyroute2", "asyncio"))


def _timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 local time with milliseconds and the UTC offset, e.g.
    2025-01-31T17:04:05.123+01:00."""
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """`<time> <prefix>LEVEL message`, the time as _timestamp gives it."""

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        return _timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, pid, and the exception
    (and stack) text when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": _timestamp(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # ASCII only: what callers sent may not be UTF-8 (surrogates are escaped too).
        return json.dumps(line, default=str)


def formatter(kind: str, text_format: str) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else TextFormatter(text_format)


def setup_logging(node, stderr_level: int = logging.WARNING) -> None:
    """Log to stderr (at `stderr_level`) and to the node's logFile (at its logLevel),
    in its logFormat. The file is reopened when it is renamed or removed (logrotate
    without copytruncate): a WatchedFileHandler."""
    kind = getattr(node, "logFormat", "text")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(stderr_level)
    stderr.setFormatter(formatter(kind, "%(asctime)s vpcni: %(levelname)s %(message)s"))
    root.addHandler(stderr)
    stderr.addFilter(_quiet_pyroute2)
    if node is not None and node.logFile:
        try:
            node.logFile.parent.mkdir(parents=True, exist_ok=True)
            # Messages quote what callers sent, which may not be UTF-8 (an environment's
            # bytes arrive as surrogates): escaped, never a logging error on stderr.
            fh = logging.handlers.WatchedFileHandler(node.logFile, errors="backslashreplace")
        except OSError as exc:
            root.warning("cannot open log file %s: %s", node.logFile, exc)
        else:
            fh.setLevel(getattr(logging, node.logLevel))
            fh.addFilter(_quiet_pyroute2)
            fh.setFormatter(formatter(
                kind, f"%(asctime)s {os.getpid()} %(levelname)s %(name)s: %(message)s"))
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
