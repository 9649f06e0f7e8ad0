"""`python -m bench.peers` (`make bench-peers`): Loom against vLLM's CPU build and llama.cpp's server."""
