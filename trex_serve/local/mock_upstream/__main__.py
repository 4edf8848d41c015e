"""``python -m trex_serve.local.mock_upstream``: run one mock upstream process."""

from trex_serve.local.mock_upstream.server import main

if __name__ == "__main__":
    main()
