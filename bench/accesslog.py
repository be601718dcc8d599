"""Micro-benchmark of the CSC's access log (csc/relay/accesslog.py): µs per request.

Writes ``--records`` events of a typical 1 KiB GET, as JSON lines, into a pipe read by
``wc -l`` (as when the CSC's stderr is a pipe to a log collector), two ways:

* ``per-event``: what the access log did before it was buffered, one
  :func:`shared.logsetup.log_event` per request (render, ``write`` and ``flush`` each time);
* ``buffered``: :func:`csc.relay.accesslog.request_done` inside a running event loop, which yields
  every ``--burst`` requests (as a node does between socket events); the flush runs on the
  loop (``call_later``).

For each it reports µs per request on the request path (the calls themselves, less any flush
they ran when the buffer was full), in the batched flushes (render and write), and in all
(process CPU time), and checks that ``wc -l`` counted every line (nothing
lost, the last batch written at the end by :func:`csc.relay.accesslog.flush`).

Usage: ``python bench/accesslog.py [--records 200000] [--burst 16]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from csc.relay import accesslog  # noqa: E402
from shared.logsetup import configure_logging, log_event  # noqa: E402


def _record() -> accesslog.RequestRecord:
    record = accesslog.RequestRecord(
        "http", "0123456789abcdef0123456789abcdef", "127.0.0.1:51234", time.monotonic()
    )
    record.alias, record.method, record.path = "bench@example.com", "GET", "/small"
    record.status, record.bytes_out = 200, 1024
    return record


def per_event(record: accesslog.RequestRecord, tenant: str | None, outcome: str) -> None:
    """The access log as it was: one rendered line, written and flushed, per request."""
    duration_ms = round((time.monotonic() - record.started) * 1000, 1)
    what = f"{record.method} /t/{record.alias}{record.path}"
    status = record.status if record.status is not None else "-"
    log_event(
        accesslog.log,
        logging.INFO,
        f"{what} -> {status} {outcome}",
        {
            "request_id": record.request_id,
            "tenant": tenant or "",
            "alias": record.alias,
            "kind": record.kind,
            "method": record.method,
            "path": record.path,
            "status": record.status,
            "outcome": outcome,
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "duration_ms": duration_ms,
            "client": record.client,
        },
    )


Done = Callable[[accesslog.RequestRecord, str | None, str], None]


_flushing = [0.0]  # seconds spent in accesslog.flush (timed by the wrapper below)
_flush = accesslog.flush


def _timed_flush() -> None:
    start = time.perf_counter()
    _flush()
    _flushing[0] += time.perf_counter() - start


async def _drive(done: Done, records: int, burst: int) -> float:
    """Call ``done`` ``records`` times, yielding to the loop every ``burst``; seconds spent in
    the calls themselves, less the flushes they ran."""
    record = _record()
    in_calls = 0.0
    for _ in range(records // burst):
        flushed = _flushing[0]
        start = time.perf_counter()
        for _ in range(burst):
            done(record, "bench", "ok")
        in_calls += time.perf_counter() - start - (_flushing[0] - flushed)
        await asyncio.sleep(0)
    return in_calls


def measure(name: str, done: Done, records: int, burst: int) -> dict[str, float]:
    counter = subprocess.Popen(["wc", "-l"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert counter.stdin is not None and counter.stdout is not None
    stream = io.TextIOWrapper(counter.stdin, encoding="utf-8", write_through=False)
    configure_logging("info", "csc", stream=stream, fmt="json")
    records -= records % burst
    _flushing[0] = 0.0
    cpu = time.process_time()
    in_calls = asyncio.run(_drive(done, records, burst))
    accesslog.flush()
    cpu = time.process_time() - cpu
    stream.close()
    lines = int(counter.stdout.read().strip())
    counter.wait()
    if lines != records:
        raise SystemExit(f"{name}: {lines} lines written of {records}")
    return {
        "request path": in_calls / records * 1e6,
        "flush": _flushing[0] / records * 1e6,
        "in all (CPU)": cpu / records * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--burst", type=int, default=16, help="requests between loop yields")
    args = parser.parse_args()
    accesslog.flush = _timed_flush  # time the batched writes
    results = {
        "per-event": measure("per-event", per_event, args.records, args.burst),
        "buffered": measure("buffered", accesslog.request_done, args.records, args.burst),
    }
    print(f"access log, {args.records:,} JSON lines into a pipe, loop yield every {args.burst}:")
    print("| path | µs/request: request path | batched flush | in all (process CPU) |")
    print("|---|---:|---:|---:|")
    for name, res in results.items():
        figures = [res["request path"], res["flush"], res["in all (CPU)"]]
        print(f"| {name} | {' | '.join(f'{f:.2f}' for f in figures)} |")
    print("every line arrived (wc -l)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
