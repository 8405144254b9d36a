"""``python -m shmstore.coordinator --config JSON [--ready-fd N]``: how serve() starts one."""

import argparse

import msgspec

from ._server import ServerConfig, main_serve


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shmstore.coordinator",
        description="Run a shmstore coordinator in the foreground (shmstore.serve() uses this).",
    )
    parser.add_argument("--config", required=True, help="the ServerConfig, as JSON")
    parser.add_argument("--ready-fd", type=int, default=-1, help="write 'ok' here once serving")
    args = parser.parse_args()
    config = msgspec.json.decode(args.config, type=ServerConfig)
    return main_serve(config, ready_fd=args.ready_fd)


raise SystemExit(main())
