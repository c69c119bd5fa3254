"""Entry point: ``python -m mmdc.eval --checkpoint DIR --benchmark scienceqa|seed|llavabench --data PATH``."""

from mmdc.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
