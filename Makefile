# cdcflow — run `make help` for the targets.
# CARGO_TARGET_DIR may point outside the clone to share one build between clones.

CARGO ?= cargo
BIN    = $(or $(CARGO_TARGET_DIR),target)/debug/cdcflow
EXAMPLE = pipelines/example.toml

.PHONY: help build run serve test chaos fuzz bench peers-up peers-down lint fmt testdata clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

build: ## Build the cdcflow binary (debug)
	$(CARGO) build --bin cdcflow

run: build ## Load testdata/ into the local warehouse and show what was loaded
	$(BIN) run --now --pipeline $(EXAMPLE)
	$(BIN) query --pipeline $(EXAMPLE) "SELECT id, customer, amount, status, commit_ts FROM orders ORDER BY commit_ts DESC LIMIT 5"
	$(BIN) status --pipeline $(EXAMPLE)

serve: build ## Serve the web UI, /metrics, /healthz and /readyz for pipelines/ on http://127.0.0.1:9464/
	$(BIN) serve --pipelines pipelines

test: peers-up ## Run every test (unit and integration, with a short chaos and fuzz pass); starts the peers first (moto S3, bqemulator, PostgreSQL, MariaDB)
	eval "$$(scripts/peers.sh all env)" && $(CARGO) test --features failpoints

chaos: peers-up ## Long fault suite: runs and backfills SIGKILLed at random (CDCFLOW_CHAOS_ROUNDS, default 40), S3 faults, 8 runs at once; pgbench and sysbench soaks with capture SIGKILLed and the servers restarted; a fleet of 1, 2 and 4 workers over 40 pipelines with one SIGKILLed
	eval "$$(scripts/peers.sh all env)" && CDCFLOW_CHAOS_ROUNDS=$${CDCFLOW_CHAOS_ROUNDS:-40} CDCFLOW_SOAK_RESTART=1 \
	  CDCFLOW_FLEET_PIPELINES=$${CDCFLOW_FLEET_PIPELINES:-40} CDCFLOW_FLEET_WORKERS=$${CDCFLOW_FLEET_WORKERS:-1,2,4} \
	  $(CARGO) test --features failpoints --test main -- chaos s3_faults killed_at_random through_kills fleet:: --nocapture --test-threads 1

fuzz: ## Mutate the DMS samples and testdata through the decoders for CDCFLOW_FUZZ_SECS (default 600) seconds
	CDCFLOW_FUZZ_SECS=$${CDCFLOW_FUZZ_SECS:-600} $(CARGO) test --features failpoints --test main -- fuzz:: --nocapture

bench: ## Benchmark vs DuckDB, Polars, pg_recvlogical, mariadb-binlog (release; BENCH_ROWS=1000000 quick); writes BENCH.md
	scripts/bench.sh

peers-up: ## Install (first time) and start the test peers on loopback
	scripts/peers.sh all start

peers-down: ## Stop the test peers
	scripts/peers.sh all stop

lint: ## clippy with warnings as errors, and rustfmt check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) fmt --check

fmt: ## Format the code
	$(CARGO) fmt

testdata: build ## Regenerate testdata/dms with the generator (deterministic)
	rm -rf testdata/dms
	$(BIN) synth --out testdata/dms --changes 2000 --seed 42

clean: ## Remove the example's state and warehouse
	rm -rf .cdcflow warehouse
