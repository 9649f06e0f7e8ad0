"""The GPU verification kit (`make gpu-check`): one script that a GPU machine runs first. See __main__.py."""
