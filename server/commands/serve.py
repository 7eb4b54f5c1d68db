"""``scaleswap serve``: the OpenAI-compatible multi-tenant server (FastAPI on uvicorn).

Flags override the ``SCALESWAP_*`` environment variables declared in ``server/settings.py``. With no admin key
the API is open, so the server binds to 127.0.0.1 only and says so; a non-loopback ``--host`` without a key is
refused. SIGTERM/SIGINT: stop accepting, mark the server draining (``/ready`` 503, new requests 503), let
in-flight requests finish for up to ``--shutdown-timeout`` seconds, then abort the rest and exit.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys

from ._common import MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the base and its tenants over an OpenAI-compatible HTTP API",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--model", help=MODEL_HELP + "; a float model is quantized on first use and cached")
    p.add_argument("--bits", type=int, help="bits when --model must be quantized (default 4)")
    p.add_argument("--group-size", type=int, help="group size when --model must be quantized (default 64)")
    p.add_argument("--served-model-name", help="the base model's id in the API (default: the base directory name)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; others need an admin key)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 = any free port)")
    p.add_argument("--data-dir", help="tenant store directory (default ./scaleswap-data)")
    p.add_argument("--admin-key", help="admin Bearer key (or SCALESWAP_ADMIN_KEY); none: open on loopback")
    p.add_argument("--device", help="auto (default: cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--max-waiting", type=int, help="waiting-queue bound; beyond it 429 (default 256)")
    p.add_argument("--max-num-seqs", type=int, help="sequences decoded together (engine default)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's, within the KV cache)")
    p.add_argument("--max-resident-tenants", type=int, help="tenant scale sets resident at once")
    p.add_argument("--max-concurrent-per-tenant", type=int, help="requests in flight per tenant (default unlimited)")
    p.add_argument("--precision", choices=("fast", "fp32"),
                   help="CPU arithmetic: fast (default: bf16 int4 matmuls and an int8 LM head for small batches; "
                        "logits within ~1.5 of float32) or fp32 (float32 throughout: a request decodes the same "
                        "alone or in any batch, up to float32 rounding; slower small batches)")
    p.add_argument("--max-upload-mb", type=float, help="largest scale-set upload in MiB (default 256)")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=float,
                   help="seconds to drain in-flight requests on SIGTERM (default 30)")
    p.add_argument("--metrics-max-tenant-labels", type=int,
                   help="tenants with their own metrics label; later ones are 'other' (default 32)")
    p.add_argument("--log-level", help="critical, error, warning, info (default), debug")
    p.set_defaults(func=run)


def build_settings(args: argparse.Namespace):
    """Settings from the environment, overridden by the flags given. Raises ValueError on invalid values."""
    from pydantic import ValidationError

    from scaleswap.server.settings import ServerSettings

    given = {k: v for k, v in vars(args).items() if k not in ("func", "verb", "debug")}
    try:
        settings = ServerSettings(**given)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}") from None
    settings.check_exposure()
    return settings


# GNU OpenMP's spin (iterations) before a waiting torch worker thread sleeps. Its default (300,000, ~ms) keeps
# a core busy between the engine's parallel regions, which starves the HTTP event loop under load; pure
# sleeping makes every small op of a decode step pay a wake-up. Measured with bench/load.py on 2 cores
# (tok/s at concurrency 1 / 16): default 39.0 / 78.4, 20,000: 32.3 / 106.3, 60,000: 37.4 / 109.2.
SERVE_GOMP_SPINCOUNT = "60000"


def run(args: argparse.Namespace) -> int:
    import os

    if "torch" not in sys.modules:  # read once, when torch loads its OpenMP runtime
        os.environ.setdefault("GOMP_SPINCOUNT", SERVE_GOMP_SPINCOUNT)
    import uvicorn

    from scaleswap.server.app import create_app

    settings = build_settings(args)
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.auth_enabled:
        print(f"scaleswap: no admin key configured: the API is open to anyone who can reach it, so it listens on "
              f"{settings.host} (loopback) only; set --admin-key or SCALESWAP_ADMIN_KEY to require keys",
              file=sys.stderr, flush=True)
    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server that marks the app draining the moment a shutdown signal arrives."""

        def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001
            state = getattr(app.state, "server", None)
            if state is not None:
                state.status = "draining"
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_timeout_s)),
                            access_log=settings.log_level in ("debug", "trace"))
    DrainingServer(config).run()
    return 0
