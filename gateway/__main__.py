"""`python -m gateway` runs the same command line as `mqtt-kinesis-gateway`."""

from gateway.cli import main

raise SystemExit(main())
