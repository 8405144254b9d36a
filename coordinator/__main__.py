"""``python -m shmstore.coordinator --config JSON [--ready-fd N]``: how serve() starts one."""

import argparse

from shmstore._errors import ShmStoreError

from ._config import decode
from ._server import EXIT_ERROR, _report, main_serve


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shmstore.coordinator",
        description="Run a shmstore coordinator in the foreground (shmstore.serve() uses this).",
    )
    parser.add_argument("--config", required=True, help="the ServerConfig, as JSON (see docs/settings.md)")
    parser.add_argument("--ready-fd", type=int, default=-1, help="write 'ok' here once serving")
    parser.add_argument("--stderr-fd", type=int, default=-1,
                        help="once serving, make this fd stderr (until then stderr is the starter's pipe)")
    args = parser.parse_args()
    try:
        import os  # noqa: PLC0415

        import msgspec  # noqa: PLC0415

        text = args.config
        if '"env:SHMSTORE_UPSTREAM_URL"' in text:  # serve() passes a replica's URL this way
            raw = msgspec.json.decode(text)
            raw["upstream"] = os.environ.pop("SHMSTORE_UPSTREAM_URL", None)
            text = msgspec.json.encode(raw)
        config = decode(text)  # the same struct and check as the caller's
    except ShmStoreError as e:
        _report(args.ready_fd, e)  # the caller gets the typed error, not a timeout
        return EXIT_ERROR
    return main_serve(config, ready_fd=args.ready_fd, stderr_fd=args.stderr_fd)


raise SystemExit(main())
