"""The test suite's loopback PostgREST stand-in (apps/api/tests/postgrest_bridge.py) as its own
process, so `make bench` can put the Supabase REST mode beside the direct one. No PostgREST server can
be installed here: these figures are the REST mode's cost through this bridge, not through a real
PostgREST (which is written in Haskell and would add its own, different, overhead).

Environment: BENCH_DSN, BENCH_JWT_SECRET, BENCH_SERVICE_KEY, PORT.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "api" / "tests"))
from postgrest_bridge import PostgrestBridge, build_app  # noqa: E402

if __name__ == "__main__":
    bridge = PostgrestBridge(
        dsn=os.environ["BENCH_DSN"],
        jwt_secret=os.environ["BENCH_JWT_SECRET"],
        api_keys=frozenset({os.environ["BENCH_SERVICE_KEY"]}),
    )
    port = int(os.environ["PORT"])
    bridge.url = f"http://127.0.0.1:{port}"
    uvicorn.run(build_app(bridge), host="127.0.0.1", port=port, log_level="warning", access_log=False)
