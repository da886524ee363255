"""Usage accounting A/B: the sidecar's CPU per request with accounting on and off, same run.

One control plane, one fake upstream (which honours ``stream_options.include_usage``
as OpenAI does), and two ``keyplane sidecar`` processes on the same core(s): one as
shipped (accounting on: usage read from every answer, streams asked for their usage
chunk and the chunk stripped, usage reported on the outcomes), one with
``--no-usage-accounting``. For each mix (plain JSON, and a stream the app did not ask
usage for: the expensive case) the two are loaded alternately for ``--duration``
seconds, ``--rounds`` times, order rotating; the figure is each sidecar's CPU seconds
(from /proc/<pid>/stat) per request, and on/off as a ratio (the issue asks within 10%).

    python -m bench.usage_overhead                  # 3 rounds x 5 s per case
    python -m bench.usage_overhead --smoke
"""

from __future__ import annotations

import sys

from bench._on_off import FeatureAB, chat_body, run

ACCOUNTING = FeatureAB(
    name="usage accounting",
    off_flag="--no-usage-accounting",
    mixes=(
        ("json", chat_body(False)),
        ("sse, usage not asked", chat_body(True)),
        ("sse, usage asked by the app", chat_body(True, usage_asked=True)),
    ),
)


def main(argv: list[str] | None = None) -> int:
    return run(ACCOUNTING, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
