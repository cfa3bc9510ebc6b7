# The two commands a newcomer needs: `make run` and `make test`. Both install what they need.
SHELL := /bin/bash
PORT ?= 8000
PYTHON ?= python3
# uv from PATH if there is one, else bootstrapped once through pip into a git-ignored folder.
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)

.PHONY: run test lint fmt token migrate install bench clean-data

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

.venv/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --quiet
	@touch $@

install: .venv/.installed

run: install
	PORT=$(PORT) $(UV) run --frozen --no-sync collection-api serve

token: install
	@$(UV) run --frozen --no-sync collection-api token $(if $(EMAIL),--email "$(EMAIL)") $(if $(ORG),--org "$(ORG)") $(if $(ROLE),--role "$(ROLE)")

migrate: install
	$(UV) run --frozen --no-sync collection-api migrate

lint: install
	$(UV) run --frozen --no-sync ruff check apps/api
	$(UV) run --frozen --no-sync ruff format --check apps/api
	$(UV) run --frozen --no-sync mypy

fmt: install
	$(UV) run --frozen --no-sync ruff format apps/api
	$(UV) run --frozen --no-sync ruff check --fix apps/api

test: install lint
	$(UV) run --frozen --no-sync pytest $(PYTEST_ARGS)

# The migrations, the Supabase CLI and the API contract suite (conftest's STORE_MODE_MODULES) on Debian's
# Postgres 15 (the wheel's is 18, Supabase runs 17); its server and plpgsql_check (which `supabase db
# lint` needs) installed with apt on first use.
PG15_BIN := /usr/lib/postgresql/15/bin
PG15_PACKAGES := postgresql-15 postgresql-15-plpgsql-check
.PHONY: test-pg15
test-pg15: install
	@test -x $(PG15_BIN)/postgres && test -f $(PG15_BIN)/../lib/plpgsql_check.so || $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive sh -c 'apt-get install -y $(PG15_PACKAGES) || (apt-get update && apt-get install -y $(PG15_PACKAGES))'
	modules=$$(PYTHONPATH=apps/api/tests $(UV) run --frozen --no-sync python -c 'from conftest import STORE_MODE_MODULES; print(" ".join(f"apps/api/tests/{m}.py" for m in sorted(STORE_MODE_MODULES)))') && \
	$(UV) run --frozen --no-sync pytest --postgres-bin=$(PG15_BIN) apps/api/tests/test_migrations.py apps/api/tests/test_supabase_cli.py $$modules $(PYTEST_ARGS)

# Benchmarks (benchmarks/README.md): wrk from Debian and the `bench` dependency group (matplotlib),
# both installed on first use; BENCH_PARTS="list http costs fleet executor" picks parts. About 10 minutes.
bench: install
	@command -v wrk >/dev/null || $(if $(filter 0,$(shell id -u)),,sudo) sh -c 'apt-get install -y wrk || (apt-get update && apt-get install -y wrk)'
	$(UV) sync --frozen --inexact --group bench --quiet
	cd benchmarks && $(abspath $(UV)) run --frozen --no-sync python run.py $(BENCH_PARTS)

clean-data:
	rm -rf .data
