"""`python -m router --config FILE`: the HTTP router, started by the `loom` launcher."""

from __future__ import annotations

import argparse

import uvicorn

from common.logs import configure_logging
from router.app import create_app
from router.config import RouterConfig
from router.connections import connection_cap, guarded_protocol

# On SIGTERM uvicorn stops accepting and waits this long for in-flight requests before cancelling them;
# the launcher allows a little more (supervisor.ROUTER_GRACE_S) before it kills the router.
GRACEFUL_SHUTDOWN_S = 25


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    p.add_argument("--config", required=True, help="RouterConfig as JSON, written by the launcher")
    args = p.parse_args(argv)
    config = RouterConfig.from_file(args.config)
    configure_logging("router")
    # log_config=None: uvicorn's own lines go through our handler (and so become JSON when asked).
    # loop="asyncio": grpc.aio's supported loop, even where uvloop is installed.
    protocol = guarded_protocol(connection_cap(config.max_connections), config.header_timeout_s)
    listen = {"uds": config.uds} if config.uds else {"host": config.hostname, "port": config.port}
    uvicorn.run(create_app(config), **listen, ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
                log_level="warning", log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                loop="asyncio", http=protocol)


if __name__ == "__main__":
    main()
