"""`python -m router --config FILE`: the HTTP router, started by the `loom` launcher."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from router.app import create_app
from router.config import RouterConfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    p.add_argument("--config", required=True, help="RouterConfig as JSON, written by the launcher")
    args = p.parse_args(argv)
    config = RouterConfig.from_file(args.config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    uvicorn.run(create_app(config), host=config.hostname, port=config.port, log_level="warning",
                timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
