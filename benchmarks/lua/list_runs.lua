-- GET /collection/runs: a page of the caller's organisation's runs (BENCH_QUERY, default limit=20).
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
wrk.method = "GET"
wrk.path = "/collection/runs?" .. (os.getenv("BENCH_QUERY") or "limit=20")
