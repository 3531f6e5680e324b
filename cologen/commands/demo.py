"""`cologen demo [CKPT | EXPORTED_FOLDER]`: serve the Gradio demo page (cologen/demo.py) on localhost.

    cologen demo                                  # the tiny experts committed with cologen (no training needed)
    cologen demo runs/tiny/stage3/last.ckpt       # a training checkpoint
    cologen demo exported/ --base-model /models/FLUX.1-dev   # an exported pipeline (flux_dev: its FLUX folder)

`--share` (off by default) asks Gradio for a public link. The same endpoint is usable without a browser through
`gradio_client` (README, "Try it in the browser").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cologen.errors import UsageError


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="cologen demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a checkpoint or an exported pipeline folder (default: the "
                                                 "committed tiny experts)")
    parser.add_argument("--base-model", help="an export's frozen base: the local FLUX.1 folder (flux_dev exports)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio link (off by default)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the demo also runs offline
    from cologen.demo import DemoModel, serve

    try:
        model = DemoModel.load(args.model, args.base_model)
    except UsageError as err:
        print(f"cologen demo: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    app = serve(model, args.host, args.port, args.share)
    print(f"cologen demo: serving {model.name} on http://{args.host}:{args.port} "
          f"(ready {time.perf_counter() - started:.1f} s after start; Ctrl+C stops)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        app.close()
