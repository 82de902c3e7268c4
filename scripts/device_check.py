"""One accelerator, one command: the tests that make sense there, then full-width Grok-2 layers
against the device's own rooflines (see --help and grok/bench/device_check.py)."""

from grok.bench.device_check import main

if __name__ == "__main__":
    main()
